"""The collector policy: when it freezes and sweeps, and what that does to a real heap."""

from __future__ import annotations

import gc
import platform
import weakref

import anyio
import pytest

from margo_stream.gcpolicy import (
    CONNECTIONS,
    GcAction,
    GcPolicy,
    apply_action,
    connection_opened,
    connections_released,
    gc_policy_running,
    resident_bytes,
    run_gc_policy,
    tick,
    trim_heap,
)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def make_cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def thawed():
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.collect()


def test_first_tick_freezes_then_waits_for_the_interval() -> None:
    p = GcPolicy(freeze_every=5, sweep_growth=0.5, sweep_min_interval=60)
    assert p.next_action(100.0, 1000, 0.0) is GcAction.FREEZE
    assert p.next_action(104.9, 1000, 0.0) is GcAction.NONE
    assert p.next_action(105.0, 1000, 0.0) is GcAction.FREEZE


def test_sweep_needs_growth_and_the_minimum_interval() -> None:
    p = GcPolicy(freeze_every=5, sweep_growth=0.5, sweep_min_interval=60)
    p.next_action(0.0, 1000, 0.0)  # the first tick's heap is the baseline
    assert p.next_action(10.0, 5000, 0.0) is GcAction.FREEZE  # grown, but 10 s in
    assert p.next_action(60.0, 1400, 0.0) is GcAction.FREEZE  # 60 s, but grown only 40 %
    assert p.next_action(65.0, 1501, 0.0) is GcAction.SWEEP  # both
    p.swept(resident=1200, frozen=10, freed=301, seconds=0.02)
    assert p.next_action(130.0, 1700, 0.0) is GcAction.FREEZE  # baseline is now 1200
    assert p.next_action(135.0, 1801, 0.0) is GcAction.SWEEP
    assert p.stats.sweeps == 1 and p.stats.freed_by_sweeps == 301


def test_a_due_sweep_waits_for_a_quiet_tick_but_not_forever() -> None:
    p = GcPolicy(
        freeze_every=5, sweep_growth=0.5, sweep_min_interval=60, busy_above=0.5, max_defer=30
    )
    p.next_action(0.0, 1000, 0.0)
    assert p.next_action(60.0, 2000, 0.0) is GcAction.SWEEP  # idle so far: due and done
    p.swept(resident=1000, frozen=10, freed=0, seconds=0.0)
    assert p.next_action(120.0, 2000, 48.0) is GcAction.FREEZE  # 80 % of a core: deferred
    assert p.next_action(125.0, 2000, 52.0) is GcAction.FREEZE  # still 80 %
    assert p.next_action(130.0, 2000, 53.0) is GcAction.SWEEP  # 20 %: quiet enough
    p.swept(resident=1000, frozen=10, freed=0, seconds=0.0)
    cpu = 53.0
    for now in range(135, 250, 5):
        cpu += 5.0  # a whole core, on and on
        if p.next_action(float(now), 2000, cpu) is GcAction.SWEEP:
            break
    assert now == 190 + 30  # due at 190 (60 s after the last sweep), then 30 s at most
    assert p.stats.deferred >= 2


def test_a_mass_disconnect_makes_a_sweep_due_without_any_growth() -> None:
    p = GcPolicy(freeze_every=1, sweep_min_interval=600, release_min_interval=10)
    p.next_action(0.0, 1000, 0.0, released=0, live=0)
    assert p.next_action(5.0, 1000, 0.0, released=0, live=4000) is GcAction.FREEZE
    # 999 of 4,000 released: under a quarter of the peak and under the count
    assert p.next_action(6.0, 1000, 0.0, released=999, live=3001) is GcAction.FREEZE
    # a quarter of the peak, but only 7 s after the start (release_min_interval 10 s)
    assert p.next_action(7.0, 1000, 0.0, released=1000, live=3000) is GcAction.FREEZE
    assert p.next_action(10.0, 1000, 0.0, released=1000, live=3000) is GcAction.SWEEP
    assert p.stats.release_sweeps == 1
    p.swept(resident=1000, frozen=1, freed=1, seconds=0.0)
    # the peak is now what is held at that sweep (3,000): 749 more is under a quarter of it
    assert p.next_action(30.0, 1000, 0.0, released=1749, live=2251) is GcAction.FREEZE
    assert p.next_action(31.0, 1000, 0.0, released=1750, live=2250) is GcAction.SWEEP


def test_a_small_server_sweeps_after_a_quarter_and_a_large_one_after_the_count() -> None:
    small = GcPolicy(freeze_every=1, release_min_interval=0)
    small.next_action(0.0, 1000, 0.0, released=0, live=4)
    assert small.next_action(1.0, 1000, 0.0, released=0, live=4) is GcAction.FREEZE
    assert small.next_action(2.0, 1000, 0.0, released=1, live=3) is GcAction.SWEEP
    large = GcPolicy(freeze_every=1, release_min_interval=0, release_count=1000)
    large.next_action(0.0, 1000, 0.0, released=0, live=50_000)
    assert large.next_action(1.0, 1000, 0.0, released=999, live=49_001) is GcAction.FREEZE
    assert large.next_action(2.0, 1000, 0.0, released=1000, live=49_000) is GcAction.SWEEP


def test_a_release_sweep_waits_for_a_quiet_tick_like_any_other() -> None:
    p = GcPolicy(freeze_every=1, release_min_interval=0, busy_above=0.5, max_defer=30)
    p.next_action(0.0, 1000, 0.0, released=0, live=100)
    assert p.next_action(1.0, 1000, 0.9, released=50, live=50) is GcAction.FREEZE  # busy
    assert p.stats.deferred == 1
    assert p.next_action(2.0, 1000, 1.0, released=50, live=50) is GcAction.SWEEP  # quiet


def test_the_servers_tally_feeds_the_policy(thawed: None) -> None:
    live, released = CONNECTIONS.live, CONNECTIONS.released
    try:
        p = GcPolicy(freeze_every=1, sweep_min_interval=1e9, release_min_interval=0)
        tick(p, 0.0)
        for _ in range(8):
            connection_opened()
        assert tick(p, 1.0) is GcAction.FREEZE  # the peak: 8 more than before
        connections_released(8)
        assert (CONNECTIONS.live, CONNECTIONS.released) == (live, released + 8)
        assert tick(p, 2.0) is GcAction.SWEEP
    finally:
        CONNECTIONS.live, CONNECTIONS.released = live, released


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trimming_hands_freed_heap_pages_back_to_the_kernel() -> None:
    """Freed memory in the middle of malloc's heap stays resident until it is trimmed."""
    mib = 1 << 20
    chunks = [bytes(1500) for _ in range(40_000)]  # ~57 MiB through malloc (> 512 bytes each)
    kept = chunks[::10]  # one in ten stays: the heap cannot shrink from the top
    del chunks
    before = resident_bytes()
    assert trim_heap()
    after = resident_bytes()
    assert before - after > 25 * mib, (before / mib, after / mib)
    assert len(kept) == 4000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"freeze_every": 0},
        {"sweep_growth": 0},
        {"sweep_min_interval": -1},
        {"release_share": 0},
        {"release_count": 0},
        {"release_min_interval": -1},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="gc policy"):
        GcPolicy(**kwargs)


def test_young_garbage_is_collected_before_freezing(thawed: None) -> None:
    p = GcPolicy()
    garbage = make_cycle()  # unreachable already: freed by the young collection, never frozen
    assert tick(p, 0.0) is GcAction.FREEZE
    assert garbage() is None
    assert gc.get_freeze_count() > 0


def test_frozen_cycles_wait_for_a_sweep_which_frees_them(thawed: None) -> None:
    p = GcPolicy(sweep_min_interval=0)
    holder = [Node()]
    holder[0].other = Node()
    holder[0].other.other = holder[0]
    ref = weakref.ref(holder[0])
    tick(p, 0.0)  # frozen while still referenced
    holder.clear()
    gc.collect()
    assert ref() is not None  # a cycle in the permanent generation: the collector skips it
    apply_action(p, GcAction.SWEEP)
    assert ref() is None
    assert p.stats.sweeps == 1 and p.stats.freed_by_sweeps >= 2
    assert gc.get_freeze_count() == p.stats.frozen_after_sweep


async def freezes_reach(policy: GcPolicy, count: int, timeout: float = 5.0) -> None:
    """Wait until the policy's thread has frozen ``count`` times (its stats are plain ints)."""
    with anyio.fail_after(timeout):
        while policy.stats.freezes < count:
            await anyio.sleep(0.005)


async def no_more_freezes(policy: GcPolicy) -> None:
    """The policy's thread is gone: for ten of its periods, its count does not move. A wait
    that IS the check: there is no event for something that no longer happens."""
    count = policy.stats.freezes
    await anyio.sleep(10 * policy.freeze_every)
    assert policy.stats.freezes == count


def test_the_policy_task_stops_with_its_scope(thawed: None) -> None:
    async def main() -> None:
        policy = GcPolicy(freeze_every=0.01)
        with anyio.fail_after(5):  # the scope's exit waits for the ticking thread to return
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_gc_policy, policy)
                await freezes_reach(policy, 2)
                tg.cancel_scope.cancel()
        assert policy.stats.freezes >= 2
        await no_more_freezes(policy)

    anyio.run(main)


def test_gc_policy_running_ends_with_its_block(thawed: None) -> None:
    async def main() -> None:
        with anyio.fail_after(5):
            async with gc_policy_running(GcPolicy(freeze_every=0.01)) as policy:
                await freezes_reach(policy, 2)
        assert policy.stats.freezes >= 2
        await no_more_freezes(policy)

    anyio.run(main)


def test_resident_bytes_grows_with_what_the_process_holds() -> None:
    before = resident_bytes()
    ballast = bytearray(64 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    assert resident_bytes() >= before + 48 * 1024 * 1024
    del ballast
