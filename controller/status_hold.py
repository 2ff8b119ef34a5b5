"""Statuses that come back while a fan-out is under way wait for its pushes.

Pushing one change to a whole fleet, the controller and the devices share their CPUs between
two kinds of work: delivering the desired state (building, sending, receiving and checking
pushes) and the bookkeeping that follows it (each device's status stored, its acknowledgement
built and sent, read by the device, and acknowledged in turn by the transport). Done in the
order things arrive, the bookkeeping for the first devices slows the delivery to the last.
Measured with 1,000 bench devices on two cores (bench/RESULTS.md, issue 20): holding the
statuses back until the pushes are out brought the last device its desired state about a
fifth sooner, and the last status was stored no later.

So while at least ``at`` pushes are awaiting their answer or a place in the push window (a
fan-out, a rollout's wave), a status that arrives is held, in arrival order, instead of being
stored and acknowledged at once; a lone push or a few never hold anything. The held statuses are
stored together (one transaction per batch) and acknowledged as soon as fewer than ``at``
pushes are outstanding, and never later than ``longest`` seconds after the first of them came:
a fan-out of 10,000 devices stores its statuses every two seconds. At most ``most`` are held;
past that a status is stored at once (the store keeps the newest status of a deployment by
its sequence number, so one stored ahead of an older held one loses nothing).

What holding costs: a status round trip up to ``longest`` longer during a fan-out, and the
transport's acknowledgement of the status's packet leaves on its own instead of riding with the
status acknowledgement. A held status is already acknowledged by the transport but not yet
stored: a controller stopped in that window loses it, and the agent sends the newest status of
every deployment again when it reconnects, so the store still converges.

The core knows no clock and no task: the caller passes the time and runs the release.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

HOLD_AT = 64  # pushes outstanding (in flight or queued) from which statuses are held
HOLD_LONGEST_S = 2.0  # a status is held this long at most (the push window's own hold)
HOLD_MOST = 20_000  # statuses held at most; past that they are stored at once
CHECK_S = 0.02  # how often the releasing task looks at the backlog

T = TypeVar("T")


class StatusHold(Generic[T]):
    """Which statuses wait, and when they go. ``backlog()`` is the number of pushes
    outstanding (``controller.push_window.PushWindow.backlog``)."""

    def __init__(
        self,
        backlog: Callable[[], int],
        *,
        at: int = HOLD_AT,
        longest: float = HOLD_LONGEST_S,
        most: int = HOLD_MOST,
    ) -> None:
        if at < 1 or longest <= 0 or most < 1:
            raise ValueError("status hold: at and most must be >= 1, longest > 0")
        self._backlog = backlog
        self.at = at
        self.longest = longest
        self.most = most
        self._held: list[T] = []
        self._since = 0.0

    @property
    def held(self) -> int:
        return len(self._held)

    def hold(self, item: T, now: float) -> bool:
        """True: ``item`` is held (the first of a hold when :attr:`held` is 1 afterwards: start
        the release); False: store it now. Once some are held, later ones join them whatever
        the backlog, so that one device's statuses keep their order."""
        if not self._held:
            if self._backlog() < self.at:
                return False
            self._since = now
        elif len(self._held) >= self.most:
            return False
        self._held.append(item)
        return True

    def due(self, now: float) -> bool:
        """Whether the held statuses should go now: the pushes are out, or the first waited
        ``longest`` seconds."""
        return bool(self._held) and (self._backlog() < self.at or now - self._since >= self.longest)

    def take(self) -> list[T]:
        """Everything held, in arrival order; the hold is empty afterwards."""
        items, self._held = self._held, []
        return items


__all__ = ["CHECK_S", "HOLD_AT", "HOLD_LONGEST_S", "HOLD_MOST", "StatusHold"]
