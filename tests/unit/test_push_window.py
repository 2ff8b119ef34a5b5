"""The push window: a bound on pushes in flight that a silent device cannot hold for long."""

from __future__ import annotations

import time

import anyio
import pytest

from controller.push_pace import MIN_ROUND, PushPace
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


def test_the_window_follows_its_pace_and_lets_waiting_pushes_in_when_it_grows() -> None:
    pace = PushPace(64, floor=2)
    pace.limit = 2
    window = PushWindow(64, hold=10, pace=pace)
    entered = 0

    async def main() -> None:
        answers = anyio.Event()

        async def push() -> None:
            nonlocal entered
            async with window.slot() as slot:
                entered += 1
                await answers.wait()
                slot.answered()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(push)
                await anyio.wait_all_tasks_blocked()
                assert (entered, window.in_flight, window.queued) == (2, 2, 8)
                # answers with nothing queued: rounds of MIN_ROUND answers grow the window
                for _ in range(MIN_ROUND):
                    window._answered(0.001)
                await anyio.wait_all_tasks_blocked()
                assert window.limit == 3 and entered == 3 and window.queued == 7
                answers.set()

    anyio.run(main)
    assert entered == 10 and window.in_flight == 0 and window.queued == 0


def test_a_push_cancelled_while_it_waits_takes_no_slot_with_it() -> None:
    window = PushWindow(1, hold=10)

    async def main() -> None:
        release = anyio.Event()

        async def holder() -> None:
            async with window.slot():
                await release.wait()

        async def waiter() -> None:
            async with window.slot():
                pass

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                await anyio.wait_all_tasks_blocked()
                async with anyio.create_task_group() as waiters:
                    waiters.start_soon(waiter)
                    await anyio.wait_all_tasks_blocked()
                    assert window.queued == 1
                    waiters.cancel_scope.cancel()
                assert window.queued == 0 and window.in_flight == 1
                release.set()
        # the slot is free again: a push takes it at once
        async with window.slot():
            assert window.in_flight == 1

    anyio.run(main)
    assert window.in_flight == 0


def test_a_pace_must_have_the_window_s_size_as_its_ceiling() -> None:
    with pytest.raises(ValueError, match="ceiling"):
        PushWindow(8, hold=1, pace=PushPace(16))
