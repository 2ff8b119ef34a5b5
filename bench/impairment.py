"""Network impairment settings and counters shared by the UDP and TCP relays.

An :class:`Impairment` describes what the emulated link does to traffic: random loss, a fixed
one-way delay with uniform jitter, reordering, and whether the link starts dead (blackholed).
The same settings apply to both directions unless ``upstream`` (client -> target) or
``downstream`` (target -> client) override them with a :class:`Link`.

Randomness is seeded. Every decision kind (loss, jitter, reorder) in every direction draws from
its own ``random.Random``, derived from ``seed``; so the n-th datagram travelling in one
direction meets the same fate in every run with the same seed, and changing the jitter does not
change which datagrams are lost. ``seed=None`` picks a fresh seed, which the relay reports in
its stats so the run can be repeated.
"""

from __future__ import annotations

import enum
import math
import random
import secrets
from dataclasses import asdict, dataclass, field, fields

from margo_stream.errors import ConfigError

__all__ = [
    "Direction",
    "DirectionStats",
    "Impairment",
    "ImpairmentError",
    "Link",
    "LinkRandom",
    "effective_seed",
]


class ImpairmentError(ConfigError, ValueError):
    """An impairment setting is out of range (for example ``loss=1.5``)."""


class Direction(enum.Enum):
    """Which way traffic travels through a relay."""

    UPSTREAM = "upstream"  # client -> target
    DOWNSTREAM = "downstream"  # target -> client


def _check_number(owner: str, name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ImpairmentError(f"{owner}.{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not lo <= value <= hi:
        bounds = f"between {lo:g} and {hi:g}" if math.isfinite(hi) else f">= {lo:g}"
        raise ImpairmentError(f"{owner}.{name} must be {bounds}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Link:
    """What one direction of the emulated link does to traffic.

    ``loss``: probability a datagram is dropped (TCP: a segment is lost and retransmitted).
    ``delay_ms``: one-way delay. ``jitter_ms``: uniform spread of the delay,
    ``delay_ms +- jitter_ms`` (never below zero). ``reorder``: probability a datagram is held
    back so that the next ``reorder_gap`` datagrams overtake it (UDP only; TCP preserves order).
    """

    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: float = 0.0

    def __post_init__(self) -> None:
        _check_number("Link", "loss", self.loss, 0.0, 1.0)
        _check_number("Link", "delay_ms", self.delay_ms, 0.0, 3_600_000.0)
        _check_number("Link", "jitter_ms", self.jitter_ms, 0.0, 3_600_000.0)
        _check_number("Link", "reorder", self.reorder, 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class Impairment:
    """Settings of an emulated link, validated on construction.

    ``loss``, ``delay_ms``, ``jitter_ms`` and ``reorder`` apply to both directions unless
    ``upstream`` / ``downstream`` give a :class:`Link` for that direction.

    ``seed``: seed of every random decision; ``None`` picks one at random (reported in stats).
    ``blackhole``: the link starts dead; control it at run time with ``relay.blackhole()``.
    ``reorder_gap``: how many later datagrams overtake a held-back one.
    ``reorder_hold_ms``: a held-back datagram is released after this long even if fewer than
    ``reorder_gap`` datagrams followed it, so the last datagram of a burst is not stuck.
    ``rto_ms``: TCP only, the retransmission timeout a lost segment costs; ``None`` means
    ``max(200 ms, 2 x RTT)`` with RTT = twice the one-way delay of that direction.
    """

    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: float = 0.0
    seed: int | None = None
    blackhole: bool = False
    reorder_gap: int = 1
    reorder_hold_ms: float = 20.0
    rto_ms: float | None = None
    upstream: Link | None = None
    downstream: Link | None = None
    _links: tuple[Link, Link] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        both = Link(self.loss, self.delay_ms, self.jitter_ms, self.reorder)
        up = self.upstream if self.upstream is not None else both
        down = self.downstream if self.downstream is not None else both
        for name, link in (("upstream", self.upstream), ("downstream", self.downstream)):
            if link is not None and not isinstance(link, Link):
                raise ImpairmentError(f"Impairment.{name} must be a Link, got {link!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ImpairmentError(f"Impairment.seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.blackhole, bool):
            raise ImpairmentError(f"Impairment.blackhole must be a bool, got {self.blackhole!r}")
        if (
            isinstance(self.reorder_gap, bool)
            or not isinstance(self.reorder_gap, int)
            or not (1 <= self.reorder_gap <= 1000)
        ):
            raise ImpairmentError(
                f"Impairment.reorder_gap must be an int between 1 and 1000, got {self.reorder_gap!r}"
            )
        _check_number("Impairment", "reorder_hold_ms", self.reorder_hold_ms, 0.0, 60_000.0)
        if self.rto_ms is not None:
            _check_number("Impairment", "rto_ms", self.rto_ms, 0.0, 600_000.0)
        object.__setattr__(self, "_links", (up, down))

    def link(self, direction: Direction) -> Link:
        """The settings that apply to ``direction``."""
        return self._links[0] if direction is Direction.UPSTREAM else self._links[1]

    def rto_s(self, direction: Direction) -> float:
        """TCP retransmission timeout, in seconds, charged for a segment lost in ``direction``."""
        if self.rto_ms is not None:
            return self.rto_ms / 1000.0
        return max(0.2, 2.0 * 2.0 * self.link(direction).delay_ms / 1000.0)

    def to_dict(self) -> dict[str, object]:
        """Plain-data form, for bench reports."""
        out: dict[str, object] = {}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            out[f.name] = asdict(value) if isinstance(value, Link) else value
        return out


class LinkRandom:
    """The seeded random streams of one direction: one per kind of decision."""

    __slots__ = ("loss", "jitter", "reorder")

    def __init__(self, seed: int, direction: Direction) -> None:
        # String seeds are hashed with SHA-512 by `random`, so they are stable across runs and
        # independent of PYTHONHASHSEED.
        self.loss = random.Random(f"{seed}/{direction.value}/loss")
        self.jitter = random.Random(f"{seed}/{direction.value}/jitter")
        self.reorder = random.Random(f"{seed}/{direction.value}/reorder")

    def delay_s(self, link: Link) -> float:
        """One draw of the one-way delay of ``link``, in seconds."""
        if link.jitter_ms <= 0.0:
            return link.delay_ms / 1000.0
        ms = link.delay_ms + self.jitter.uniform(-link.jitter_ms, link.jitter_ms)
        return max(0.0, ms) / 1000.0


def effective_seed(seed: int | None) -> int:
    """``seed``, or a fresh random one when it is ``None``."""
    return secrets.randbits(32) if seed is None else seed


@dataclass(slots=True)
class DirectionStats:
    """Counters of one direction of a relay.

    UDP: ``forwarded`` datagrams were sent on; each dropped one is counted under exactly one
    ``dropped_*`` reason; ``reordered`` counts held-back datagrams that were overtaken.
    TCP: ``forwarded`` counts chunks (one ``recv`` each) written on; ``dropped_loss`` counts
    emulated segment losses, each of which delayed its chunk by a retransmission timeout while
    no bytes were dropped (``rto_penalty_s`` sums those penalties); ``dropped_blackhole`` counts
    the times a blackhole stalled (never dropped) this direction of a connection.
    """

    forwarded: int = 0
    bytes_forwarded: int = 0
    dropped_loss: int = 0
    dropped_blackhole: int = 0
    dropped_overflow: int = 0
    dropped_send_error: int = 0
    reordered: int = 0
    rto_penalty_s: float = 0.0

    def copy(self) -> DirectionStats:
        return DirectionStats(**asdict(self))

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


class RelayProperties:
    """What both relays expose the same way (their ``__init__`` sets the underscored fields)."""

    _address: tuple[str, int] | None
    _target: tuple[str, int]
    _impairment: Impairment
    _seed: int
    _blackholed: bool

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) clients should use."""
        if self._address is None:
            raise RuntimeError(f"{type(self).__name__} is not running; use `async with`")
        return self._address

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def target(self) -> tuple[str, int]:
        return self._target

    @property
    def impairment(self) -> Impairment:
        return self._impairment

    @property
    def seed(self) -> int:
        """The seed in use (picked at random when the impairment's seed is ``None``)."""
        return self._seed

    @property
    def blackholed(self) -> bool:
        return self._blackholed
