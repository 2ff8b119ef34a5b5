"""How many desired-state pushes may await their answer at once, learnt from the answers.

Theory of operation
-------------------
A fleet-wide change is pushed to every device at once, bounded by a window of pushes in
flight (``controller.push_window``). A window too small for the fleet wastes time: a push waits
for a slot while the controller and the devices have room. A window too large piles pushes up
where the work is slow (the controller's own loop, a site's shared link, devices that share a
host): every answer then comes late, QUIC's probe timers fire on connections whose packets are
only waiting their turn, and the retransmissions are more work for both ends. Measured with the
bench's 10,000 devices sharing one core: a fixed window of 512 gave 11 datagrams a device and a
24 s fan-out, a window of 32 gave 7 and 21 s, with a quarter less CPU on both sides (one run
each: bench/RESULTS.md).

``PushPace`` sizes the window the way TCP Vegas sizes a congestion window, from delay, not
loss. Each answered push reports how long it took (slot taken to the device's verdict). The
*base* is the shortest answer of the last ``2 * base_period`` seconds: what a push costs with
nothing queued in front of it. A push's *queueing* is how much longer than the base it took.
The answers are taken in rounds of about half a window (at least ``MIN_ROUND``) of pushes sent
after the last decision (an answer to a push sent before it cannot show what the decision did),
and at the end of each round the round's median queueing decides:

* above ``target``: the window shrinks to ``SHRINK`` of itself, to ``SHRINK_FAR`` above four
  times the target (not below ``floor``);
* below half of ``target``: it grows by half of itself (not above ``ceiling``, the operator's
  ``--push-window``);
* otherwise it stays.

The median, not the slowest answer, decides: a fleet with a few devices on a slow link (a
satellite site answering in 600 ms) is not queueing, and must not shrink everybody's window. A
fleet whose devices are mostly that slow has a base that says so after one base period.

A fresh controller knows nothing of its fleet, so the window starts at the ceiling: a fleet no
larger than it gets every push at once, which measured fastest at 1,000 bench devices (their
answers come back within a round or two of the window, before any decision could help), and a
larger fleet has the window learnt within its first few rounds.

The core knows no clock and no task: the caller passes the time with each answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FLOOR = 16  # the window never shrinks below this (a slow fleet is still pushed to in parallel)
TARGET_QUEUE_S = 0.05  # the queueing a round's median may show (an idle QUIC connection's
# first probe fires tens of milliseconds after its packet, the next ones twice as late each)
BASE_PERIOD_S = 10.0  # the base is the shortest answer of the last two such periods
MIN_ROUND = 8  # answers in a round at least, so that one answer never decides
SHRINK = 0.7  # of itself, when a round's median queued past the target
SHRINK_FAR = 0.5  # ... when it queued past four times the target


@dataclass(slots=True)
class _RollingMin:
    """The minimum of the values of the current and the previous ``period``."""

    period: float
    started: float = -math.inf
    current: float = math.inf
    previous: float = math.inf

    def add(self, value: float, now: float) -> None:
        if now - self.started >= self.period:
            # one period on: the current bucket becomes the previous; more: both are stale
            self.previous = self.current if now - self.started < 2 * self.period else math.inf
            self.current = math.inf
            self.started = now
        self.current = min(self.current, value)

    @property
    def value(self) -> float:
        return min(self.current, self.previous)


@dataclass(slots=True)
class PaceChange:
    """What one round decided (for logs and tests)."""

    limit: int
    median_queue_s: float
    base_s: float


@dataclass(slots=True)
class PushPace:
    ceiling: int
    floor: int = FLOOR
    target: float = TARGET_QUEUE_S
    base_period: float = BASE_PERIOD_S
    limit: int = 0  # 0: the ceiling (within floor and ceiling)
    _base: _RollingMin = field(init=False)
    _round: list[float] = field(init=False, default_factory=list)
    _decided_at: float = field(init=False, default=-math.inf)

    def __post_init__(self) -> None:
        if self.ceiling < 1:
            raise ValueError(f"push window: the ceiling must be >= 1, not {self.ceiling}")
        if not self.target > 0 or not self.base_period > 0:
            raise ValueError("push window: target and base period must be > 0")
        self.floor = max(1, min(self.floor, self.ceiling))
        self.limit = min(self.ceiling, max(self.floor, self.limit or self.ceiling))
        self._base = _RollingMin(self.base_period)

    @property
    def base(self) -> float:
        return self._base.value

    def answered(self, seconds: float, now: float) -> PaceChange | None:
        """One push was answered after ``seconds``; returns the round's decision when this
        answer ended a round (the window may have changed), else ``None``."""
        seconds = max(0.0, seconds)
        self._base.add(seconds, now)
        if now - seconds < self._decided_at:
            return None  # sent before the last decision: it cannot show what that did
        self._round.append(seconds)
        if len(self._round) < max(MIN_ROUND, self.limit // 2):
            return None
        base = self._base.value
        ordered = sorted(self._round)
        self._round.clear()
        self._decided_at = now
        queue = ordered[len(ordered) // 2] - base
        if queue > self.target:
            shrink = SHRINK_FAR if queue > 4 * self.target else SHRINK
            self.limit = max(self.floor, int(self.limit * shrink))
        elif queue < self.target / 2:
            self.limit = min(self.ceiling, self.limit + max(1, self.limit // 2))
        return PaceChange(self.limit, queue, base)


__all__ = ["FLOOR", "PaceChange", "PushPace"]
