"""Cluster change notifications against a real PostgreSQL: LISTEN/NOTIFY wakes the feed, the
catch-up read delivers what no notification announced (a dropped listening connection, a row
with no NOTIFY), every change once and in order, never the feed's own."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from controller.cluster import changes
from controller.ports import ChangeKind, ClusterChange
from tests.unit.test_cluster_leases import cluster_db

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def db(pg_dsn):
    async with cluster_db(pg_dsn) as pool:
        yield pool


def change(n: int, origin: str = "B", kind: ChangeKind = ChangeKind.DESIRED) -> ClusterChange:
    return ClusterChange(kind, "acme", (f"d{n}",), origin=origin)


class Inbox:
    def __init__(self) -> None:
        self.items: list[ClusterChange] = []
        self._more = anyio.Event()

    async def handle(self, item: ClusterChange) -> None:
        self.items.append(item)
        self._more.set()

    async def until(self, count: int, timeout: float = 10.0) -> list[ClusterChange]:
        with anyio.fail_after(timeout):
            while len(self.items) < count:
                await self._more.wait()
                self._more = anyio.Event()
        return self.items


def test_changes_round_trip_and_garbage_is_refused():
    c = ClusterChange(ChangeKind.REPLACED, "acme", ("a", "b/c"), (3, 9), "host-1-ab")
    assert changes.decode(changes.encode(c)) == c
    assert changes.decode(changes.encode(change(1))) == change(1)
    for bad in (
        '"x"',
        '{"kind": "nope", "tenant": "t"}',
        '{"kind": "desired", "tenant": 1}',
        '{"kind": "desired", "tenant": "t", "devices": [1]}',
        '{"kind": "replaced", "tenant": "t", "generations": ["1"]}',
    ):
        with pytest.raises((ValueError, KeyError)):
            changes.decode(bad)


async def test_a_notification_wakes_the_feed_and_its_own_changes_are_skipped(db, pg_dsn):
    inbox = Inbox()
    feed = changes.ChangeFeed(lambda: asyncpg.connect(pg_dsn), "A", inbox.handle, poll=30)
    async with anyio.create_task_group() as tg:
        await tg.start(feed.run)
        await changes.publish(db, change(1, origin="A"))  # A's own: not handed back
        await changes.publish(db, change(2))
        started = anyio.current_time()
        got = await inbox.until(1)
        # woken by NOTIFY, not by the 30 s poll
        assert anyio.current_time() - started < 5
        assert got == [change(2)]
        tg.cancel_scope.cancel()


async def test_a_change_without_a_notification_is_read_by_the_next_poll(db, pg_dsn):
    inbox = Inbox()
    feed = changes.ChangeFeed(lambda: asyncpg.connect(pg_dsn), "A", inbox.handle, poll=0.3)
    async with anyio.create_task_group() as tg:
        await tg.start(feed.run)
        # as if the notification were lost: the row only
        await db.execute(
            "INSERT INTO cluster_changes (payload) VALUES ($1::jsonb)", changes.encode(change(7))
        )
        assert await inbox.until(1) == [change(7)]
        tg.cancel_scope.cancel()


async def test_changes_published_while_the_listener_is_cut_off_arrive_after_it_reconnects(
    db, pg_dsn
):
    inbox = Inbox()
    connections: list[asyncpg.Connection] = []

    async def connect() -> asyncpg.Connection:
        conn = await asyncpg.connect(pg_dsn)
        connections.append(conn)
        return conn

    # a long poll and a long retry: only the reconnect's catch-up can deliver in time
    feed = changes.ChangeFeed(connect, "A", inbox.handle, poll=60, retry=1.0)
    async with anyio.create_task_group() as tg:
        await tg.start(feed.run)
        await changes.publish(db, change(1))
        await inbox.until(1)
        pid = connections[-1].get_server_pid()
        # kill the listening connection, then publish while nobody listens
        assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        await changes.publish(db, change(2))
        await changes.publish(db, change(3))
        got = await inbox.until(3, timeout=15)
        assert got == [change(1), change(2), change(3)]
        assert feed.reconnects >= 1 and len(connections) >= 2
        tg.cancel_scope.cancel()


async def test_concurrent_publishers_every_change_once_in_order(db, pg_dsn):
    inbox = Inbox()
    feed = changes.ChangeFeed(lambda: asyncpg.connect(pg_dsn), "A", inbox.handle, poll=1)
    ids: list[int] = []

    async def publisher(start: int) -> None:
        for n in range(start, start + 50):
            ids.append(await changes.publish(db, change(n)))

    async with anyio.create_task_group() as tg:
        await tg.start(feed.run)
        async with anyio.create_task_group() as pubs:
            for k in range(6):
                pubs.start_soon(publisher, k * 1000)
        got = await inbox.until(300, timeout=20)
        await anyio.sleep(1.5)  # a poll more: nothing is handed over twice
        tg.cancel_scope.cancel()
    assert len(inbox.items) == 300
    assert {c.devices[0] for c in got} == {f"d{k * 1000 + n}" for k in range(6) for n in range(50)}
    assert feed.last_id == max(ids)


async def test_a_feed_cut_off_longer_than_changes_are_kept_resyncs(db, pg_dsn, monkeypatch):
    inbox = Inbox()
    connections: list[asyncpg.Connection] = []

    async def connect() -> asyncpg.Connection:
        conn = await asyncpg.connect(pg_dsn)
        connections.append(conn)
        return conn

    monkeypatch.setattr(changes, "KEEP", 1.0)
    feed = changes.ChangeFeed(connect, "A", inbox.handle, poll=60, retry=1.5)
    async with anyio.create_task_group() as tg:
        await tg.start(feed.run)
        await changes.publish(db, change(1))
        await inbox.until(1)
        await db.fetchval("SELECT pg_terminate_backend($1)", connections[-1].get_server_pid())
        await changes.publish(db, change(2))
        await anyio.sleep(1.2)
        await changes.prune(db, keep=1.0)  # change 2 is gone before the feed is back
        got = await inbox.until(2, timeout=15)
        assert got[1].kind is ChangeKind.RESYNC
        tg.cancel_scope.cancel()
