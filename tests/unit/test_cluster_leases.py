"""Device leases against a real PostgreSQL: generations, fencing, expiry, concurrent takers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

from controller.cluster import leases
from controller.cluster.pg import PgCluster
from controller.cluster.pg_tables import create_tables
from controller.ports import ChangeKind, ClusterChange, Holder, Lease

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@contextlib.asynccontextmanager
async def cluster_db(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on ``dsn`` with the cluster's tables made."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8)
    try:
        async with pool.acquire() as conn:
            await create_tables(conn)
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def db(pg_dsn):
    async with cluster_db(pg_dsn) as pool:
        yield pool


def instances(holders: dict[str, Holder]) -> dict[str, str]:
    return {device: holder.instance for device, holder in holders.items()}


async def alive(db: asyncpg.Pool, *instances: str, seconds: float = 60) -> None:
    for instance in instances:
        await leases.heartbeat(db, instance, seconds)


async def test_each_acquisition_takes_the_next_generation_whoever_held_it(db):
    await alive(db, "A", "B")
    a = await leases.acquire(db, "A", "acme", "d1")
    assert (a.generation, a.previous) == (1, None)
    b = await leases.acquire(db, "B", "acme", "d1")
    assert (b.generation, b.previous) == (2, "A")
    again = await leases.acquire(db, "B", "acme", "d1")  # its own: nobody to tell
    assert (again.generation, again.previous) == (3, None)
    back = await leases.acquire(db, "A", "acme", "d1")
    assert (back.generation, back.previous) == (4, "B")
    other = await leases.acquire(db, "A", "globex", "d1", "tcp")  # tenants apart
    assert other.generation == 1
    assert await leases.holders(db, "globex") == {"d1": Holder("A", "tcp")}
    assert instances(await leases.holders(db, "acme")) == {"d1": "A"}
    assert instances(await leases.holders(db, "acme", ["d1", "nope"])) == {"d1": "A"}


async def test_a_holder_that_lost_its_lease_can_neither_keep_nor_release_it(db):
    await alive(db, "A", "B", "C")
    old = await leases.acquire(db, "A", "acme", "d1")
    new = await leases.acquire(db, "B", "acme", "d1")
    mine = await leases.acquire(db, "A", "acme", "d2")
    assert await leases.live_count(db, "A") == 1  # d1 is B's now
    assert await leases.live_leases(db, "A") == {("acme", "d2", mine.generation)}
    assert not await leases.release(db, "A", old)  # fenced: B keeps the device
    assert instances(await leases.holders(db, "acme", ["d1"])) == {"d1": "B"}
    # a stale generation of the right instance is refused too
    stale = Lease("acme", "d1", new.generation - 1)
    assert not await leases.release(db, "B", stale)
    assert await leases.release(db, "B", new)
    assert instances(await leases.holders(db, "acme", ["d1"])) == {}
    # released, not forgotten: the next holder's generation is past every earlier one
    nxt = await leases.acquire(db, "C", "acme", "d1")
    assert nxt.generation == new.generation + 1


async def test_leases_end_with_their_instance_heartbeat(db):
    await alive(db, "A", "B", seconds=0.5)
    await leases.acquire(db, "A", "acme", "d1")
    await leases.acquire(db, "B", "acme", "d2")
    assert await leases.acquire(db, "C", "acme", "d3")  # C never said it is alive
    assert instances(await leases.holders(db, "acme")) == {"d1": "A", "d2": "B"}
    await anyio.sleep(0.3)
    await alive(db, "B", seconds=0.5)
    await anyio.sleep(0.4)  # A's heartbeat lapsed (and its lease with it), B's did not
    assert instances(await leases.holders(db, "acme")) == {"d2": "B"}
    await anyio.sleep(0.6)
    assert instances(await leases.holders(db, "acme")) == {}
    await alive(db, "A")  # an instance that comes back (the store was out of reach) holds again
    assert instances(await leases.holders(db, "acme")) == {"d1": "A"}


async def test_concurrent_takers_get_distinct_increasing_generations(db):
    await alive(db, "I0", "I1", "I2")
    got: dict[int, tuple[str, Lease]] = {}

    async def take(n: int) -> None:
        instance = f"I{n % 3}"
        lease = await leases.acquire(db, instance, "acme", "hot")
        assert lease.generation not in got
        got[lease.generation] = (instance, lease)

    async with anyio.create_task_group() as tg:  # the first acquisitions race the insert too
        for n in range(24):
            tg.start_soon(take, n)
    assert sorted(got) == list(range(1, 25))
    # each taker saw the holder just before it: the row was locked, not read stale
    for generation in range(2, 25):
        before, (instance, lease) = got[generation - 1][0], got[generation]
        assert lease.previous == (before if before != instance else None)
    assert instances(await leases.holders(db, "acme")) == {"hot": got[24][0]}


async def test_one_heartbeat_keeps_thousands_of_leases(db):
    await alive(db, "A")
    for n in range(200):
        await leases.acquire(db, "A", "acme", f"d{n}")
    assert len(instances(await leases.holders(db, "acme"))) == 200
    assert await leases.live_count(db, "A") == 200
    assert await leases.release_all(db, "A") == 200
    assert instances(await leases.holders(db, "acme")) == {}


async def test_pg_cluster_tells_the_old_holder_and_fences_its_session(pg_dsn):
    a = PgCluster(pg_dsn, "A", lease_time=6, renew_every=2, poll=0.5)
    b = PgCluster(pg_dsn, "B", lease_time=6, renew_every=2, poll=0.5)
    heard: list[ClusterChange] = []
    lost_a: list[Lease] = []
    got = anyio.Event()

    async def on_change(change: ClusterChange) -> None:
        heard.append(change)
        got.set()

    async def ignore(change: ClusterChange) -> None:
        pass

    await a.open()
    await b.open()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(a.run, on_change, lost_a.append)
            await tg.start(b.run, ignore, lambda lease: None)
            first = await a.acquire("acme", "d1")
            taken = await b.acquire("acme", "d1")
            assert taken.previous == "A" and taken.generation == first.generation + 1
            b.replaced(taken)
            with anyio.fail_after(5):
                await got.wait()
            assert heard[0].kind is ChangeKind.REPLACED
            assert heard[0].devices == ("d1",) and heard[0].generations == (taken.generation,)
            assert heard[0].origin == "B"
            # A's heartbeat finds it holds fewer than it thought: reported lost, once
            assert await a.renew_now(lost_a.append) == 1
            assert lost_a == [first]
            assert a.held == 0 and b.held == 1
            assert not await a.release(first)  # fenced
            assert instances(await b.holders("acme")) == {"d1": "B"}
            tg.cancel_scope.cancel()
    finally:
        await a.close()
        await b.close()
    probe = PgCluster(pg_dsn, "probe")
    await probe.open()
    try:
        # B left cleanly: its leases are released, its instance row gone
        assert instances(await probe.holders("acme")) == {}
        assert await probe.db.fetchval("SELECT count(*) FROM controller_instances") == 1
    finally:
        await probe.close()
