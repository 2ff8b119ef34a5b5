"""Durable writes (fsync and friends) on a small pool of long-lived threads.

An fsync must not run on the event loop, and the hop to a thread is on the path of every push
a device applies (its trust state is durable before it reports ``installed``). anyio's
``to_thread.run_sync`` costs 70-95 us of CPU a call here (a capacity limiter, a cancel scope,
a queue per worker) and retires a thread idle for 10 s, so a device that applies a change a
minute starts a new thread for each (about 110 us more); a ``ThreadPoolExecutor`` costs 25-45
us a call and keeps its threads. ``run_durable`` is shielded from cancellation like
``to_thread.run_sync``: the caller waits for a write that started, so nothing runs on after
the scope that asked for it has closed.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

DURABLE_THREADS = 16  # at most; made when writes overlap (a simulated fleet), else one

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(DURABLE_THREADS, thread_name_prefix="margo-durable")
    return _pool


async def run_durable(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a durable-write thread; its result or its exception."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(_executor(), functools.partial(fn, *args))
    with anyio.CancelScope(shield=True):
        result = await future
    return result
