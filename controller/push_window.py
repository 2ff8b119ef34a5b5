"""How many desired-state pushes may await their device's answer at once.

Pushing to every device of a fleet at the same moment overloads both ends: answers come back
late, QUIC's probe timers fire on thousands of connections and retransmit, which is more work
still (measured at 10,000 devices: 27 datagrams per device instead of 6, and the last status
a minute late). A window of pushes in flight keeps the round trips short; the rest wait their
turn, which on a healthy fleet is a few milliseconds. A device that does not answer gives its
slot back after ``hold`` seconds, so a dead connection cannot stall everybody else's push.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio


class PushWindow:
    def __init__(self, size: int, hold: float) -> None:
        if size < 1 or hold <= 0:
            raise ValueError("push window: size must be >= 1 and hold > 0")
        self.size = size
        self.hold = hold
        self._slots = anyio.Semaphore(size)
        self.observe: Callable[[float], None] | None = None  # each push's seconds (metrics)

    @property
    def in_flight(self) -> int:
        return self.size - self._slots.value

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:  # a free slot is taken without a turn of the loop (a lone push starts at once)
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            await self._slots.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._slots.release()

        loop = asyncio.get_running_loop()
        started = loop.time()
        timer = loop.call_later(self.hold, release)
        try:
            yield
        finally:
            timer.cancel()
            release()
            if self.observe is not None:
                self.observe(loop.time() - started)


__all__ = ["PushWindow"]
