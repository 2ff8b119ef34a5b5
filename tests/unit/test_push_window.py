"""The push window: a bound on pushes in flight that a silent device cannot hold for long."""

from __future__ import annotations

import time

import anyio
import pytest

from controller.push_window import PushWindow


def test_at_most_size_pushes_at_once() -> None:
    window = PushWindow(3, hold=10)
    peak = 0

    async def push() -> None:
        nonlocal peak
        async with window.slot():
            peak = max(peak, window.in_flight)
            await anyio.sleep(0.01)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(push)

    anyio.run(main)
    assert peak == 3 and window.in_flight == 0


def test_a_device_that_does_not_answer_gives_its_slot_back_after_hold() -> None:
    window = PushWindow(1, hold=0.2)
    started: list[float] = []

    async def push(seconds: float) -> None:
        async with window.slot():
            started.append(time.monotonic())
            await anyio.sleep(seconds)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(push, 1.0)  # silent device
            await anyio.sleep(0.01)
            tg.start_soon(push, 0.0)

    anyio.run(main, backend="asyncio")
    assert started[1] - started[0] < 0.6
    assert window.in_flight == 0  # released once, not twice


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="push window"):
        PushWindow(0, 1.0)
