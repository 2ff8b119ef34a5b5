"""How many desired-state pushes may await their device's answer at once.

Pushing to every device of a fleet at the same moment overloads both ends: answers come back
late, QUIC's probe timers fire on thousands of connections and retransmit, which is more work
still (measured at 10,000 devices: 27 datagrams per device instead of 6, and the last status
a minute late). A window of pushes in flight keeps the round trips short; the rest wait their
turn, which on a healthy fleet is a few milliseconds. A device that does not answer gives its
slot back after ``hold`` seconds, so a dead connection cannot stall everybody else's push.

The window's size is the ``limit`` of a :class:`controller.push_pace.PushPace`, which learns
it from how long the answers take (see there); the window hands out slots, in the order they
were asked for, while fewer than ``limit`` are taken. A window made without a pace keeps its
size fixed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio

from controller.push_pace import PushPace

log = logging.getLogger("margo.controller.push_window")

HOLD = 2.0  # a push unanswered this long stops counting against the window


class Slot:
    """One push's place in the window; the push calls :meth:`answered` once its device's
    verdict is in (a push that failed says nothing, and teaches the pace nothing)."""

    __slots__ = ("_window", "started", "_answered")

    def __init__(self, window: PushWindow, started: float) -> None:
        self._window = window
        self.started = started
        self._answered = False

    def answered(self) -> None:
        if not self._answered:
            self._answered = True
            self._window._answered(anyio.current_time() - self.started)


class PushWindow:
    def __init__(self, size: int, hold: float = HOLD, *, pace: PushPace | None = None) -> None:
        if size < 1 or hold <= 0:
            raise ValueError("push window: size must be >= 1 and hold > 0")
        if pace is not None and pace.ceiling != size:
            raise ValueError("push window: the pace's ceiling must be the window's size")
        self.size = size
        self.hold = hold
        self.pace = pace
        self._taken = 0
        self._waiting: deque[anyio.Event] = deque()
        self.observe: Callable[[float], None] | None = None  # each push's seconds (metrics)

    @property
    def limit(self) -> int:
        return self.pace.limit if self.pace is not None else self.size

    @property
    def in_flight(self) -> int:
        return self._taken

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def _grant(self) -> None:
        while self._waiting and self._taken < self.limit:
            self._taken += 1
            self._waiting.popleft().set()

    def _release(self) -> None:
        self._taken -= 1
        self._grant()

    def _answered(self, seconds: float) -> None:
        if self.pace is None:
            return
        change = self.pace.answered(seconds, anyio.current_time())
        if change is not None:
            log.debug(
                "push window %d: a round's median push queued %.1f ms over its base of %.1f ms",
                change.limit,
                1000 * change.median_queue_s,
                1000 * change.base_s,
            )
            self._grant()  # a larger window lets waiting pushes in at once

    async def _take(self) -> None:
        if self._taken < self.limit and not self._waiting:
            self._taken += 1  # a free slot is taken without a turn of the loop
            return
        granted = anyio.Event()
        self._waiting.append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self._release()  # granted as we were cancelled: hand it on
            else:
                self._waiting.remove(granted)
            raise

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        await self._take()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release()

        loop = asyncio.get_running_loop()
        started = loop.time()
        timer = loop.call_later(self.hold, release)
        try:
            yield Slot(self, started)
        finally:
            timer.cancel()
            release()
            if self.observe is not None:
                self.observe(loop.time() - started)


__all__ = ["HOLD", "PushWindow", "Slot"]
