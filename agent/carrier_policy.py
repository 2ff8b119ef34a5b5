"""Which carrier the agent dials, sans-IO: QUIC first, TLS over TCP when UDP does not get
through, and back to QUIC when it does again.

Theory of operation
-------------------
The channel runs over QUIC or over TLS 1.3 on TCP (HTTP/2); both carry every feature. QUIC is
preferred (no head-of-line blocking between streams, connection migration), TCP is the way
through networks that drop UDP or allow only an HTTP proxy. :class:`CarrierPolicy` decides,
for each attempt the connect loop makes (``agent.controller_list`` picks *where*, this module
picks *how*); it holds no socket and no clock: the driver passes ``now`` (wall-clock seconds,
so that what it remembers survives a restart) and reports what happened.

- **Fresh attempt** (:meth:`first`): QUIC with ``quic_timeout`` for its handshake, unless QUIC
  failed recently *and TCP worked right after* (the fallback holds): then TCP at once, so that a
  reconnect or a restart does not pay ``quic_timeout`` again and again on a network that drops
  UDP. The hold lasts ``quic_retry`` seconds from the last QUIC failure and no longer.
- **QUIC failed** (:meth:`quic_failed`: no handshake within ``quic_timeout``): TCP to the same
  controller (``--tcp-controller`` or the same host and port). The failure counts only if TCP
  then works (:meth:`connected`); a controller that answers neither is down, not behind a UDP
  block, and the next attempt tries QUIC first again.
- **On TCP**, :meth:`probe_at` says when to probe QUIC: ``quic_retry`` after the last QUIC
  failure. The driver makes a real QUIC handshake to the same controller (``quic_timeout``
  bound) and checks its certificate. A failed probe (:meth:`probe_failed`) restarts the wait; a
  successful one (:meth:`probe_succeeded`) means *move back*: the driver ends the TCP session
  cleanly and runs the next session over the probe's connection, already through its
  handshake (promoted, not thrown away: one handshake fewer, and the path just proven is the one
  used). Nothing is lost in the move: unacknowledged telemetry is replayed on the new session
  and the controller resends desired state that did not complete on the old one.
- **Memory** (:meth:`remembered`, and ``remembered=`` at start): the carrier in use and when QUIC
  last failed, which the driver keeps in the state directory. A remembered failure from the
  future (the clock stepped back) or older than ``quic_retry`` is ignored.

States::

    QUIC_FIRST --first--> DialQuic --quic_failed--> DialTcp --connected(TCP)--> ON_TCP (hold)
    ON_TCP  --probe_at due--> probe --probe_failed--> ON_TCP (hold restarted)
                                    --probe_succeeded--> QUIC_FIRST (move back on the probe)
    ON_TCP  --disconnected--> first() = DialTcp while the hold lasts, DialQuic after it
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

MAX_MEMORY_BYTES = 4096  # the remembered carrier is a few dozen bytes; more is not ours


class Carrier(enum.StrEnum):
    QUIC = "quic"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class DialQuic:
    """Dial QUIC; no handshake within ``timeout`` seconds: report :meth:`quic_failed`."""

    timeout: float
    reason: str


@dataclass(frozen=True, slots=True)
class DialTcp:
    """Dial TLS over TCP (through the proxy when one applies)."""

    reason: str


Dial = DialQuic | DialTcp


@dataclass(frozen=True, slots=True)
class Remembered:
    """What the agent keeps across restarts: the carrier it used last and, when that was TCP
    because QUIC failed, when QUIC failed (wall-clock seconds)."""

    carrier: Carrier
    quic_failed_at: float | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {"carrier": self.carrier.value, "quic_failed_at": self.quic_failed_at}
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Remembered | None:
        """The remembered carrier, or None for anything that is not one (never an error: the
        memory only saves time)."""
        if len(data) > MAX_MEMORY_BYTES:
            return None
        try:
            raw: Any = json.loads(data)
            carrier = Carrier(raw["carrier"])
            failed = raw.get("quic_failed_at")
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if failed is not None and not isinstance(failed, int | float):
            return None
        return cls(carrier, None if failed is None else float(failed))


class CarrierPolicy:
    def __init__(
        self,
        quic_timeout: float,
        quic_retry: float,
        *,
        now: float,
        remembered: Remembered | None = None,
    ) -> None:
        if quic_timeout <= 0 or quic_retry <= 0:
            raise ValueError("quic_timeout and quic_retry must be positive")
        self.quic_timeout = quic_timeout
        self.quic_retry = quic_retry
        self.current: Carrier | None = None  # the carrier of the session up now
        # When QUIC last failed with TCP working after it; None: no fallback holds
        self.quic_failed_at: float | None = None
        self._attempt_failed_at: float | None = None  # QUIC failed on the attempt under way
        if (
            remembered is not None
            and remembered.carrier is Carrier.TCP
            and remembered.quic_failed_at is not None
            and 0 <= now - remembered.quic_failed_at < quic_retry
        ):
            self.quic_failed_at = remembered.quic_failed_at

    # --- attempts --------------------------------------------------------------------------------
    def holding(self, now: float) -> bool:
        """True while a recent QUIC failure (with TCP working after it) sends attempts to TCP."""
        failed = self.quic_failed_at
        return failed is not None and 0 <= now - failed < self.quic_retry

    def first(self, now: float) -> Dial:
        """How a fresh attempt starts."""
        if self.holding(now):
            assert self.quic_failed_at is not None
            left = self.quic_failed_at + self.quic_retry - now
            return DialTcp(
                f"QUIC failed {now - self.quic_failed_at:.0f} s ago; "
                f"QUIC is tried again in {left:.0f} s"
            )
        if self.quic_failed_at is not None:
            self.quic_failed_at = None  # the hold is over (or the clock stepped back)
            return DialQuic(self.quic_timeout, "QUIC retry period over")
        return DialQuic(self.quic_timeout, "QUIC first")

    def quic_failed(self, now: float, why: str) -> DialTcp:
        """The QUIC attempt got no handshake (``why``): fall back to TCP."""
        self._attempt_failed_at = now
        return DialTcp(f"no QUIC handshake: {why}")

    def connected(self, carrier: Carrier, now: float) -> None:
        """A session is up over ``carrier`` (the controller accepted the hello)."""
        self.current = carrier
        if carrier is Carrier.QUIC:
            self.quic_failed_at = None
        elif self._attempt_failed_at is not None:
            self.quic_failed_at = self._attempt_failed_at
        elif self.quic_failed_at is None:
            self.quic_failed_at = now  # on TCP without a failure on record: probe in a period
        self._attempt_failed_at = None

    def disconnected(self) -> None:
        """The attempt or the session ended (a QUIC failure of an attempt that did not get
        through on TCP either is forgotten: the controller was down, UDP was not the cause)."""
        self.current = None
        self._attempt_failed_at = None

    # --- probing while on TCP ----------------------------------------------------------------------
    def probe_at(self) -> float | None:
        """When to probe QUIC next (wall clock); None unless a session is up over TCP."""
        if self.current is not Carrier.TCP or self.quic_failed_at is None:
            return None
        return self.quic_failed_at + self.quic_retry

    def probe_failed(self, now: float) -> None:
        self.quic_failed_at = now

    def probe_succeeded(self, now: float) -> None:
        """QUIC works again: the driver moves the session to the probe's connection."""
        self.quic_failed_at = None

    # --- memory ---------------------------------------------------------------------------------------
    def remembered(self) -> Remembered:
        if self.quic_failed_at is not None:
            return Remembered(Carrier.TCP, self.quic_failed_at)
        return Remembered(self.current or Carrier.QUIC)


__all__ = [
    "Carrier",
    "CarrierPolicy",
    "Dial",
    "DialQuic",
    "DialTcp",
    "Remembered",
]
