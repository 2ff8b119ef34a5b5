"""uvicorn inside the controller's event loop, ticking once a second instead of ten times.

uvicorn's ``Server.main_loop`` wakes every 0.1 s to refresh its ``Date`` header (once a second)
and to look at ``should_exit``: ten wake-ups a second for nothing on an idle controller, paid
once per controller process (``--workers``, several instances on one store). Here the loop
sleeps a second between ticks, or less when ``stop`` is called, so shutting down is as prompt
as before. Signals belong to the controller, not to uvicorn.
"""

from __future__ import annotations

import contextlib

import anyio
import uvicorn

TICK_S = 1.0  # uvicorn's on_tick refreshes the Date header when counter % 10 == 0


class EmbeddedUvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._stop_event: anyio.Event | None = None

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()

    def stop(self) -> None:
        """Ask the server to exit at once (from the event loop's thread)."""
        self.should_exit = True
        if self._stop_event is not None:
            self._stop_event.set()

    async def main_loop(self) -> None:
        self._stop_event = anyio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000  # every tick is a "whole second" tick for uvicorn
            with anyio.move_on_after(TICK_S):
                await self._stop_event.wait()
            should_exit = await self.on_tick(counter)
