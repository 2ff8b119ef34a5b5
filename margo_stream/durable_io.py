"""Durable writes (fsync and friends) on a small pool of long-lived threads.

An fsync must not run on the event loop, and the hop to a thread is on the path of every push
a device applies (its trust state is durable before it reports ``installed``). anyio's
``to_thread.run_sync`` costs 70-95 us of CPU a call here (a capacity limiter, a cancel scope,
a queue per worker) and retires a thread idle for 10 s, so a device that applies a change a
minute starts a new thread for each (about 110 us more). ``loop.run_in_executor`` with a
``ThreadPoolExecutor`` keeps its threads but still wraps each call in two futures chained
across threads, and checks for an idle worker with a semaphore. The pool here hands the loop's
own future to a kept thread through one queue and sets it with one ``call_soon_threadsafe``:
48 us less CPU a write than the executor and 41 us sooner back on the loop, one writer at a
time (``margo-bench durable-hop``; bench/RESULTS.md, issue 20's section).

``run_durable`` is shielded from cancellation like ``to_thread.run_sync``: the caller waits
for a write that started, so nothing runs on after the scope that asked for it has closed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

DURABLE_THREADS = 16  # at most; made when writes overlap (a simulated fleet), else one

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the loop cancelled it meanwhile (only when the loop itself stops)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DurableThreads:
    """Kept threads that run jobs from one queue; a new thread only when none is idle."""

    def __init__(self, limit: int = DURABLE_THREADS, name: str = "margo-durable") -> None:
        if limit < 1:
            raise ValueError(f"a durable-write pool needs at least 1 thread, not {limit}")
        self.limit = limit
        self.name = name
        self.threads = 0
        self._idle = 0  # threads waiting for a job (under _lock)
        self._lock = threading.Lock()
        self._jobs: SimpleQueue[_Job] = SimpleQueue()

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1  # that thread takes this job
                start = False
            else:
                start = self.threads < self.limit
                if start:
                    self.threads += 1
                    name = f"{self.name}-{self.threads}"
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            loop, future, fn, args = jobs.get()
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                error = exc
            with self._lock:
                self._idle += 1  # before the caller hears: its next write finds this thread
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more
            del loop, future, fn, args, result, error  # nothing held while idle


_pool: DurableThreads | None = None
_pool_lock = threading.Lock()


def _threads() -> DurableThreads:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = DurableThreads()
    return _pool


async def run_durable(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a durable-write thread; its result or its exception."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    _threads().submit((loop, future, fn, args))
    with anyio.CancelScope(shield=True):
        result = await future
    return result
