"""The push window: a bound on pushes in flight that a silent device cannot hold for long."""

from __future__ import annotations

import time

import anyio
import pytest

from controller.push_window import PushWindow


def test_at_most_size_pushes_at_once() -> None:
    window = PushWindow(3, hold=10)
    peak = 0
    entered = 0

    async def main() -> None:
        answers = anyio.Event()  # the devices answer only once the test has looked

        async def push() -> None:
            nonlocal peak, entered
            async with window.slot():
                entered += 1
                peak = max(peak, window.in_flight)
                await answers.wait()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(push)
                await anyio.wait_all_tasks_blocked()
                # every push is blocked now: three await their answer, the rest a slot
                assert entered == 3 and window.in_flight == 3
                answers.set()

    anyio.run(main)
    assert entered == 20 and peak == 3 and window.in_flight == 0


def test_a_device_that_does_not_answer_gives_its_slot_back_after_hold() -> None:
    window = PushWindow(1, hold=0.2)
    started: list[float] = []

    async def main() -> None:
        holding, second_done = anyio.Event(), anyio.Event()

        async def silent_push() -> None:
            async with window.slot():
                started.append(time.monotonic())
                holding.set()
                await second_done.wait()  # never answers while the other push waits

        async def push() -> None:
            async with window.slot():
                started.append(time.monotonic())
            second_done.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(silent_push)
                await holding.wait()
                tg.start_soon(push)

    anyio.run(main, backend="asyncio")
    # the only way in for the second push was the silent one's slot coming back after hold
    assert 0.2 - 0.01 <= started[1] - started[0] < 0.6
    assert window.in_flight == 0  # released once, not twice


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="push window"):
        PushWindow(0, 1.0)
