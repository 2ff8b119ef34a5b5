"""Durable writes on the pool's long-lived threads (margo_stream.durable_io): off the loop,
results and errors handed back, threads kept between writes, as many as writes overlap and
never more than the limit, and a cancelled caller waits for the write it started (nothing
runs on after its scope closed)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import anyio
import pytest

from margo_stream.durable_io import DurableThreads, run_durable

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_runs_off_the_loop_on_a_kept_thread() -> None:
    names = [await run_durable(lambda: threading.current_thread().name) for _ in range(5)]
    assert all(n.startswith("margo-durable") for n in names)
    assert len(set(names)) == 1  # one write at a time: the same thread, not a new one each
    with pytest.raises(OSError, match="disk"):
        await run_durable(_fail)


async def test_a_cancelled_caller_waits_for_its_write() -> None:
    done: list[float] = []

    def write() -> None:
        time.sleep(0.2)
        done.append(time.monotonic())

    with anyio.CancelScope() as scope:
        scope.cancel()  # already cancelled when the write is asked for
        await run_durable(write)
    assert done  # finished before the scope closed


async def test_overlapping_writes_share_at_most_the_limit_of_threads() -> None:
    pool = DurableThreads(limit=3, name="test-durable")
    loop = asyncio.get_running_loop()
    running = [0, 0]  # now, most at once

    def write(n: int) -> tuple[int, str]:
        running[0] += 1
        running[1] = max(running[1], running[0])
        time.sleep(0.05)
        running[0] -= 1
        return n, threading.current_thread().name

    async def one(n: int) -> tuple[int, str]:
        future: asyncio.Future[Any] = loop.create_future()
        pool.submit((loop, future, write, (n,)))
        result: tuple[int, str] = await future
        return result

    results = await asyncio.gather(*(one(n) for n in range(9)))
    assert [n for n, _ in results] == list(range(9))  # each caller got its own result
    assert pool.threads == 3 and running[1] == 3  # three at once: the limit, reached
    assert {name for _, name in results} == {f"test-durable-{k}" for k in (1, 2, 3)}
    # idle again: a lone write takes a kept thread, none is added
    await one(9)
    assert pool.threads == 3
    with pytest.raises(ValueError, match="at least 1 thread"):
        DurableThreads(limit=0)


def _fail() -> None:
    raise OSError("disk gone")
