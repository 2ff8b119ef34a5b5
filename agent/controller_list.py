"""Which controller the agent dials next, sans-IO: the ``--controller`` list in its own order.

Theory of operation
-------------------
``margo-agent --controller A,B,C`` names several controllers (``HOST:PORT`` each; a host may be
a DNS name with several addresses). :func:`parse_controllers` turns the text into
:class:`ControllerEntry` values once, at start, and refuses an empty entry, a bad port or a
duplicate with a one-line error naming it.

:class:`ControllerOrder` decides where to connect. It knows no socket, no resolver and no
clock: it is given the entries, a random generator (:func:`order_rng`: the device id plus fresh
randomness, so a fleet spreads), a :class:`~agent.backoff.Backoff`, the addresses the driver
resolved and the outcome of every attempt; it answers with the next action.

- **Order.** The entries are shuffled once, when the order is made. The addresses of one DNS
  name are ranked by a keyed hash (a key drawn from the same generator): the ranking is fixed
  for this agent but differs between agents, and stays put when a name's address set changes.
  Every target carries its key ``(entry position, address rank)``; a pass is the targets in key
  order, rotated to start where the last one left off.
- **Passes.** A pass tries every target once, without waiting between them. A name is resolved
  again for every pass (:class:`Resolve`; the driver bounds the time and logs failures, and a
  name that did not resolve just has no targets in that pass). An address reached through two
  entries is tried once. Only when a whole pass failed does the agent back off
  (:class:`Wait`, the existing capped exponential backoff with full jitter); a connection that
  got through (:meth:`ready`) resets it.
- **A lost connection** (:meth:`lost`) starts a new pass at once with the *next* target,
  leaving the lost one out of it: with one controller that pass is empty, so the agent backs
  off and retries it exactly as before. A connection that was up for less than ``stable_after``
  seconds earns no fresh pass: the current pass simply goes on (and ends in a back-off), so a
  controller that accepts and drops at once, or two agents with one identity that replace each
  other, cannot make the agent hop without pause. ``retry_same`` (the agent closed the
  connection itself, to present a renewed certificate) starts the new pass at the same target.

Actions, at each :meth:`next_action`::

    START      -> RESOLVING   Resolve(names)            (names among the entries)
    START      -> DIALLING    Dial(first target)        (only addresses, or after resolved())
    PASSING    -> DIALLING    Dial(next target)
    PASSING    -> START       Wait(backoff delay)       (the pass is exhausted)

Outcomes: ``resolved`` RESOLVING -> PASSING; ``failed`` DIALLING -> PASSING; ``ready``
DIALLING -> CONNECTED; ``lost`` CONNECTED -> START (a fresh pass) or PASSING (a short-lived
connection: the pass goes on).
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import random
import re
import secrets
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.backoff import Backoff
from margo_stream.errors import ConfigError
from margo_stream.transport.quic_client import parse_host_port

STABLE_AFTER_S = 10.0  # a connection up this long earns an immediate hop when it is lost

_HOSTNAME = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$"
)


@dataclass(frozen=True, slots=True)
class ControllerEntry:
    """One ``HOST:PORT`` of ``--controller``; ``host`` is an IP address or a DNS name."""

    host: str
    port: int

    @property
    def literal(self) -> bool:
        """An IP address: dialled as it is, never resolved."""
        return _ip(self.host) is not None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Target:
    """One address to dial, and the entry it came from (for logs, status and the key)."""

    entry: ControllerEntry
    address: str
    key: tuple[int, bytes]  # (entry position in the shuffled order, address rank)

    @property
    def port(self) -> int:
        return self.entry.port

    @property
    def endpoint(self) -> str:
        """``address:port`` as dialled."""
        return str(ControllerEntry(self.address, self.entry.port))

    def __str__(self) -> str:
        return str(self.entry) if self.entry.literal else f"{self.entry} ({self.address})"


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_controllers(text: str, *, what: str = "--controller") -> tuple[ControllerEntry, ...]:
    """``HOST:PORT[,HOST:PORT...]`` -> the entries, in the order given; ``ConfigError`` with a
    one-line message naming the entry at fault."""
    entries: list[ControllerEntry] = []
    seen: dict[ControllerEntry, int] = {}
    for number, raw in enumerate(text.split(","), start=1):
        item = raw.strip()
        if not item:
            raise ConfigError(f"{what} {text!r}: entry {number} is empty")
        host, port = parse_host_port(item, what=f"{what} entry")
        if port == 0:
            raise ConfigError(f"{what} entry {item!r}: port 0 is out of range (1-65535)")
        ip = _ip(host)
        if ip is not None:
            host = str(ip)  # one spelling per address, so duplicates are seen
        elif _HOSTNAME.match(host):
            host = host.lower().rstrip(".")
        else:
            raise ConfigError(f"{what} entry {item!r}: {host!r} is not an IP address or host name")
        entry = ControllerEntry(host, port)
        if entry in seen:
            raise ConfigError(f"{what} entry {number} {item!r} repeats entry {seen[entry]}")
        seen[entry] = number
        entries.append(entry)
    return tuple(entries)


def order_rng(device_id: str, seed: str | None = None) -> random.Random:
    """The generator an agent's order is drawn from: its device id and fresh randomness
    (``seed`` replaces the randomness, for a test that must know the order)."""
    salt = secrets.token_hex(16) if seed is None else seed
    return random.Random(f"{device_id}\x00{salt}")


# --- actions ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Resolve:
    """Resolve these names (bounded in time) and hand the addresses to ``resolved``."""

    entries: tuple[ControllerEntry, ...]


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to ``target``; report ``failed`` or ``ready`` (then ``lost``)."""

    target: Target


@dataclass(frozen=True, slots=True)
class Wait:
    """A whole pass failed: sleep ``delay`` seconds, then ask again."""

    delay: float


Action = Resolve | Dial | Wait


class Phase(enum.Enum):
    START = "start"  # a pass begins at the next next_action()
    RESOLVING = "resolving"  # Resolve is out: waiting for resolved()
    PASSING = "passing"  # dialling the pass's targets one after another
    DIALLING = "dialling"  # Dial is out: waiting for failed() or ready()
    CONNECTED = "connected"  # waiting for lost()


class Resume(enum.Enum):
    """Where the next pass starts, relative to the last target (the cursor)."""

    AFTER = "after"  # the target after it; it comes last (after a failure)
    SKIP = "skip"  # the target after it; it is left out of this pass (after a loss)
    AT = "at"  # the target itself (after the agent's own reconnect)


class ControllerOrder:
    def __init__(
        self,
        entries: Sequence[ControllerEntry],
        rng: random.Random,
        backoff: Backoff,
        *,
        stable_after: float = STABLE_AFTER_S,
    ) -> None:
        if not entries:
            raise ValueError("a controller order needs at least one entry")
        self.entries: tuple[ControllerEntry, ...] = tuple(rng.sample(list(entries), len(entries)))
        self._rank_key = rng.randbytes(16)
        self.backoff = backoff
        self.stable_after = stable_after
        self.phase = Phase.START
        self.passes = 0  # passes begun
        self._queue: deque[Target] = deque()
        self._cursor: Target | None = None
        self._resume = Resume.AFTER

    @property
    def names(self) -> tuple[ControllerEntry, ...]:
        """The entries that must be resolved for every pass."""
        return tuple(e for e in self.entries if not e.literal)

    # --- actions --------------------------------------------------------------------------------
    def next_action(self) -> Action:
        if self.phase is Phase.START:
            names = self.names
            if names:
                self.phase = Phase.RESOLVING
                return Resolve(names)
            self._begin({})
        if self.phase is not Phase.PASSING:
            raise RuntimeError(f"next_action while {self.phase.value}")
        if self._queue:
            self.phase = Phase.DIALLING
            return Dial(self._queue.popleft())
        self.phase = Phase.START
        return Wait(self.backoff.next_delay())

    # --- outcomes -------------------------------------------------------------------------------
    def resolved(self, addresses: Mapping[ControllerEntry, Sequence[str]]) -> None:
        """The addresses each name resolved to this pass (a name missing: none this pass)."""
        self._expect(Phase.RESOLVING)
        self._begin(addresses)

    def failed(self, target: Target) -> None:
        """No session with ``target`` (unreachable, timed out, refused): on to the next."""
        self._expect(Phase.DIALLING)
        self._cursor, self._resume = target, Resume.AFTER
        self.phase = Phase.PASSING

    def ready(self, target: Target) -> None:
        """The controller accepted the hello: the backoff starts over."""
        self._expect(Phase.DIALLING)
        self.backoff.reset()
        self.phase = Phase.CONNECTED

    def lost(self, target: Target, uptime: float, *, retry_same: bool = False) -> None:
        """The session with ``target`` ended after ``uptime`` seconds."""
        self._expect(Phase.CONNECTED)
        self._cursor = target
        if retry_same:
            self._resume, self.phase = Resume.AT, Phase.START
        elif uptime >= self.stable_after:
            self._resume, self.phase = Resume.SKIP, Phase.START
        else:  # short-lived: the pass it came from goes on
            self._resume, self.phase = Resume.AFTER, Phase.PASSING

    # --- passes ---------------------------------------------------------------------------------
    def targets(self, addresses: Mapping[ControllerEntry, Sequence[str]]) -> list[Target]:
        """Every target in key order, each ``address:port`` once."""
        out: list[Target] = []
        seen: set[tuple[str, int]] = set()
        for position, entry in enumerate(self.entries):
            found = [entry.host] if entry.literal else addresses.get(entry, ())
            for address in sorted(set(found), key=self._rank):
                if (address, entry.port) not in seen:
                    seen.add((address, entry.port))
                    out.append(Target(entry, address, (position, self._rank(address))))
        return out

    def _begin(self, addresses: Mapping[ControllerEntry, Sequence[str]]) -> None:
        targets = self.targets(addresses)
        cursor = self._cursor
        if cursor is not None:
            if self._resume is Resume.AT:
                start = next((i for i, t in enumerate(targets) if t.key >= cursor.key), 0)
            else:
                start = next((i for i, t in enumerate(targets) if t.key > cursor.key), 0)
            targets = targets[start:] + targets[:start]
            if self._resume is Resume.SKIP:
                lost = (cursor.address, cursor.port)
                targets = [t for t in targets if (t.address, t.port) != lost]
        self._queue = deque(targets)
        self._resume = Resume.AFTER
        self.passes += 1
        self.phase = Phase.PASSING

    def _rank(self, address: str) -> bytes:
        return hashlib.blake2b(address.encode(), key=self._rank_key, digest_size=8).digest()

    def _expect(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise RuntimeError(f"outcome while {self.phase.value}, expected {phase.value}")
