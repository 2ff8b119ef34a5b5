"""The agent's keepalive, sans-IO: when to ping the controller and when to give the link up.

Theory of operation
-------------------
A QUIC peer acknowledges every PING (and an HTTP/2 peer every PING frame), so any packet that
arrives after a ping proves the peer alive. ``Keepalive`` pings every ``interval``; a ping with
no packet back within ``probe`` is a *miss*, and a miss is followed at once by the next ping
(not a whole interval later): ``dead_after`` misses in a row, ``dead_after * probe`` seconds of
silence after the first unanswered ping (6 s by default), declare the link dead. A healthy
controller answers within milliseconds; one that was killed or lost its host cannot say the
connection is gone, so this bounds how long its devices stay with it: at most ``interval`` +
``dead_after * probe`` after it died.

The core knows no clock and no socket. The driver calls :meth:`Keepalive.timer` with the time
(``now``, any monotonic clock) and the time the last packet arrived (``last_received``, same
clock) whenever :attr:`Keepalive.deadline` has passed, and carries out the action it returns:
:class:`SendPing` (send one transport ping) or :class:`LinkDead` (close the connection). Calls
before the deadline do nothing, so an early wake-up is harmless.

A ping is sent only after an interval of silence: any packet proves the link alive as well as
a ping's answer would, so while the controller sends (a push, its acknowledgements) the next
ping moves to an interval after the last packet. A busy link carries no pings, and the bound
above holds, since the last packet came before the controller died.

Phases, at each deadline::

    WAITING  -> WAITING   a packet arrived within the interval; deadline last packet + interval
    WAITING  -> PROBING   an interval of silence: emit SendPing; deadline now + probe
    PROBING  -> WAITING   a packet arrived since the ping; misses = 0; deadline now + interval
    PROBING  -> PROBING   silence, misses < dead_after; emit SendPing; deadline now + probe
    PROBING  -> DEAD      silence, misses == dead_after; emit LinkDead (final)
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

PROBE_S = 2.0  # a ping unanswered this long is a miss (at most half the interval)
DEAD_AFTER_MISSES = 3


class Phase(enum.Enum):
    WAITING = "waiting"  # the link is fine; the next ping is an interval away
    PROBING = "probing"  # a ping is out; waiting ``probe`` for any packet
    DEAD = "dead"  # ``dead_after`` misses in a row: the link is given up (final)


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send one transport-level ping now."""


@dataclass(frozen=True, slots=True)
class LinkDead:
    """Give the link up: nothing arrived for ``silent_s`` seconds over ``misses`` pings."""

    silent_s: float
    misses: int


KeepaliveAction = SendPing | LinkDead


class Keepalive:
    def __init__(
        self,
        interval: float,
        now: float,
        *,
        probe: float | None = None,
        dead_after: int = DEAD_AFTER_MISSES,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"keepalive interval must be > 0, not {interval!r}")
        probe = min(PROBE_S, interval / 2) if probe is None else probe
        if not probe > 0:
            raise ValueError(f"keepalive probe must be > 0, not {probe!r}")
        if dead_after < 1:
            raise ValueError(f"dead_after must be >= 1, not {dead_after!r}")
        self.interval = interval
        self.probe = probe
        self.dead_after = dead_after
        self.phase = Phase.WAITING
        self.misses = 0
        self.deadline = now + interval
        self._ping_sent_at = -math.inf

    def timer(self, now: float, last_received: float) -> KeepaliveAction | None:
        """Advance to ``now``; returns what the driver must do, if anything."""
        if self.phase is Phase.DEAD or now < self.deadline:
            return None
        if self.phase is Phase.WAITING:
            if last_received + self.interval > now:
                # heard from within the interval: the link is proven alive without a ping
                self.deadline = last_received + self.interval
                return None
            return self._ping(now)  # an interval of silence: time to ping
        if last_received >= self._ping_sent_at:  # answered
            self.misses = 0
            self.phase = Phase.WAITING
            self.deadline = now + self.interval
            return None
        self.misses += 1
        if self.misses >= self.dead_after:
            self.phase = Phase.DEAD
            self.deadline = math.inf
            return LinkDead(silent_s=now - last_received, misses=self.misses)
        return self._ping(now)  # missed: the next ping at once

    def _ping(self, now: float) -> SendPing:
        self.phase = Phase.PROBING
        self._ping_sent_at = now
        self.deadline = now + self.probe
        return SendPing()
