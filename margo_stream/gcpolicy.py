"""Keeps CPython's cyclic garbage collector off a service's long-lived heap.

A controller holding 10,000 QUIC connections has about 4 million container objects that live
as long as their connections. CPython rescans every one of them in each full (generation 2)
collection, and starts one whenever the objects that survived into generation 2 since the last
full pass reach a quarter of the long-lived ones, which is all the time while devices connect
or a push fans out. Measured in one 10,000-device push run (``margo-bench run push``): the
controller spent 21.6 s in collections longer than 20 ms, the longest 3.2 s, and each device
worker 26.7 s (longest 4.1 s); with this policy, 2.7 s and 2.4 s, none longer than 0.3 s.

The policy, run every ``freeze_every`` seconds:

- collect the young generations (cyclic garbage that is young is freed, not kept), then move
  every surviving object into the permanent generation (``gc.freeze()``): the collector's own
  passes then only scan what was allocated since the last tick;
- objects in the permanent generation are still freed by reference counting the moment the
  last reference goes; only garbage *cycles* among them wait, for a **sweep**:
  ``gc.unfreeze()``, a full collection, ``gc.freeze()``. A sweep starts once the process's
  resident memory has grown by ``sweep_growth`` (a fraction) since the last sweep, and at most
  once per ``sweep_min_interval`` seconds; so held-back garbage stays within about that
  fraction of the live heap, and a heap that doubles costs one full scan rather than dozens.
  (Resident memory, not ``gc.get_freeze_count()``: that walks the whole list, 4 million objects
  in a controller holding 10,000 connections.)
  A sweep that falls due while the process is busy (more than ``busy_above`` of a core since
  the last tick: devices connecting, a push fanning out) waits for a quieter tick, at most
  ``max_defer`` seconds.
- a sweep also falls due after a **mass disconnect**: resident memory does not shrink when
  connections close, so growth alone would never notice that a flood of half-open handshakes
  or a fleet's worth of sessions just became garbage (cycles among frozen objects, which only
  a sweep frees). The QUIC server reports every connection it creates and forgets
  (:func:`connection_opened`, :func:`connections_released`); once the connections released
  since the last sweep reach ``release_count`` or ``release_share`` of the most held at once
  since then, a sweep is due after ``release_min_interval`` seconds (the busy rule applies).
  Tying it to the peak keeps the garbage held back within a share of the live heap, as for
  growth; the count cap bounds it in absolute terms on a large controller.
- after a sweep, glibc's ``malloc_trim(0)`` hands the freed pages back to the kernel (on
  glibc only): without it the process keeps them and its resident memory stays at the peak.

:class:`GcPolicy` decides (the time, resident memory and CPU used in, an action out);
:func:`run_gc_policy` applies it from a thread of its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import gc
import logging
import os
import platform
import resource
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

import anyio

log = logging.getLogger("margo_stream.gc")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class GcAction(enum.Enum):
    NONE = "none"
    FREEZE = "freeze"  # young generations collected, survivors frozen
    SWEEP = "sweep"  # everything unfrozen, one full collection, survivors frozen


@dataclass(slots=True)
class GcStats:
    freezes: int = 0
    sweeps: int = 0
    sweep_seconds: float = 0.0
    freed_by_sweeps: int = 0
    frozen_after_sweep: int = 0  # objects in the permanent generation after the last sweep
    deferred: int = 0  # ticks at which a due sweep waited because the process was busy
    release_sweeps: int = 0  # sweeps that fell due because connections were released
    trims: int = 0  # malloc_trim calls that handed memory back


@dataclass(slots=True)
class GcPolicy:
    """When to freeze and when to sweep; no clock or collector of its own."""

    freeze_every: float = 1.0
    sweep_growth: float = 1.0
    sweep_min_interval: float = 600.0
    busy_above: float = 0.5  # share of a core used since the last tick that counts as busy
    max_defer: float = 600.0  # a due sweep waits at most this long for a quiet tick
    release_share: float = 0.25  # released since the last sweep / most connections held since
    release_count: int = 1000  # ... or this many released, whatever the peak
    release_min_interval: float = 10.0  # a release-triggered sweep: at most once per this
    stats: GcStats = field(default_factory=GcStats)
    _last_tick: float | None = None
    _last_cpu: float = 0.0
    _last_sweep: float = 0.0
    _due_since: float | None = None
    _baseline: int = 0  # resident bytes right after the last sweep
    _released_at_sweep: int = 0  # the released-connections count at the last sweep
    _peak: int = 0  # most connections held at a tick since the last sweep

    def __post_init__(self) -> None:
        if self.freeze_every <= 0 or self.sweep_growth <= 0 or self.sweep_min_interval < 0:
            raise ValueError(
                "gc policy: freeze_every and sweep_growth must be > 0, sweep_min_interval >= 0"
            )
        if self.release_share <= 0 or self.release_count < 1 or self.release_min_interval < 0:
            raise ValueError(
                "gc policy: release_share must be > 0, release_count >= 1, "
                "release_min_interval >= 0"
            )

    def next_action(
        self, now: float, resident: int, cpu: float, released: int = 0, live: int = 0
    ) -> GcAction:
        """What to do at ``now``, the process holding ``resident`` bytes of memory, having
        used ``cpu`` seconds of CPU in all (``time.process_time()``), released ``released``
        connections in all and holding ``live`` now."""
        self._peak = max(self._peak, live)
        if self._last_tick is None:  # the first tick: what the process built so far is frozen
            self._last_tick, self._last_cpu, self._last_sweep = now, cpu, now
            self._baseline, self._released_at_sweep = resident, released
            return GcAction.FREEZE
        elapsed = now - self._last_tick
        if elapsed < self.freeze_every:
            return GcAction.NONE
        busy = (cpu - self._last_cpu) / elapsed > self.busy_above
        self._last_tick, self._last_cpu = now, cpu
        since = now - self._last_sweep
        grown = resident > self._baseline * (1.0 + self.sweep_growth)
        by_growth = grown and since >= self.sweep_min_interval
        by_release = self._mass_release(released) and since >= self.release_min_interval
        if not (by_growth or by_release):
            return GcAction.FREEZE
        if self._due_since is None:
            self._due_since = now
        if busy and now - self._due_since < self.max_defer:
            self.stats.deferred += 1
            return GcAction.FREEZE  # a full pass now would stall the work in progress
        self._last_sweep, self._due_since = now, None
        self._released_at_sweep, self._peak = released, live
        if by_release and not by_growth:
            self.stats.release_sweeps += 1
        return GcAction.SWEEP

    def _mass_release(self, released: int) -> bool:
        count = released - self._released_at_sweep
        return count > 0 and (
            count >= self.release_count or count >= self.release_share * self._peak
        )

    def swept(self, resident: int, frozen: int, freed: int, seconds: float) -> None:
        self._baseline = resident
        self.stats.sweeps += 1
        self.stats.sweep_seconds += seconds
        self.stats.freed_by_sweeps += freed
        self.stats.frozen_after_sweep = frozen


def resident_bytes() -> int:
    """This process's resident memory (``/proc/self/statm``; the peak where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def apply_action(policy: GcPolicy, action: GcAction) -> None:
    """Carry out ``action`` on this process's collector."""
    if action is GcAction.FREEZE:
        gc.collect(1)  # young cyclic garbage is freed rather than frozen (a few thousand objects)
        gc.freeze()
        policy.stats.freezes += 1
    elif action is GcAction.SWEEP:
        t0 = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        if trim_heap():
            policy.stats.trims += 1
        seconds = time.perf_counter() - t0
        frozen = gc.get_freeze_count()  # walks the whole list: only here, never per tick
        policy.swept(resident_bytes(), frozen, freed, seconds)
        log.info(
            "gc sweep: %d objects kept, %d freed, %.1f ms",
            frozen,
            freed,
            seconds * 1000,
            extra={"frozen": frozen, "freed": freed, "ms": round(seconds * 1000, 1)},
        )


class ConnectionTally:
    """How many connections this process holds and has released in all: the servers report
    (on the event loop), the policy's thread reads (plain ints under the GIL)."""

    __slots__ = ("live", "released")

    def __init__(self) -> None:
        self.live = 0
        self.released = 0


CONNECTIONS = ConnectionTally()


def connection_opened() -> None:
    """A server created a connection (its state now counts in this process's heap)."""
    CONNECTIONS.live += 1


def connections_released(count: int = 1) -> None:
    """A server forgot ``count`` connections: their memory is garbage for the next sweep."""
    CONNECTIONS.live -= count
    CONNECTIONS.released += count


def _load_malloc_trim() -> Callable[[int], int] | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return cast(Callable[[int], int], trim)


_MALLOC_TRIM = _load_malloc_trim()


def trim_heap() -> bool:
    """glibc's ``malloc_trim(0)``: free pages in malloc's heaps go back to the kernel (the
    call releases the GIL). False where there is no glibc or nothing was handed back."""
    return _MALLOC_TRIM is not None and bool(_MALLOC_TRIM(0))


def tick(policy: GcPolicy, now: float) -> GcAction:
    """One step of the policy against the live collector."""
    action = policy.next_action(
        now, resident_bytes(), time.process_time(), CONNECTIONS.released, CONNECTIONS.live
    )
    apply_action(policy, action)
    return action


async def run_gc_policy(policy: GcPolicy | None = None) -> None:
    """The policy's task, until cancelled. It ticks on a thread of its own: when the event loop
    is busy for seconds on end (a fleet-wide push) is exactly when the collector needs it."""
    policy = policy or GcPolicy()
    stop = threading.Event()

    def ticking() -> None:
        tick(policy, time.monotonic())
        while not stop.wait(policy.freeze_every):
            tick(policy, time.monotonic())

    async def stopper() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stopper)
        await anyio.to_thread.run_sync(ticking, limiter=anyio.CapacityLimiter(1))


@asynccontextmanager
async def gc_policy_running(policy: GcPolicy | None = None) -> AsyncIterator[GcPolicy]:
    """The policy's task for the duration of the block."""
    policy = policy or GcPolicy()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_gc_policy, policy)
        try:
            yield policy
        finally:
            tg.cancel_scope.cancel()


__all__ = [
    "CONNECTIONS",
    "ConnectionTally",
    "GcAction",
    "GcPolicy",
    "GcStats",
    "apply_action",
    "connection_opened",
    "connections_released",
    "gc_policy_running",
    "run_gc_policy",
    "tick",
    "trim_heap",
]
