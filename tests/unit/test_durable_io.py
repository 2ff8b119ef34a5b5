"""Durable writes on the pool's long-lived threads (margo_stream.durable_io): off the loop,
results and errors handed back, threads kept between writes, and a cancelled caller waits
for the write it started (nothing runs on after its scope closed)."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from margo_stream.durable_io import run_durable

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


def _fail() -> None:
    raise OSError("disk gone")
