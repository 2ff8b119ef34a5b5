"""What only the SQLite store does, on real database files: WAL and one worker thread, its
migrations, and its errors (corrupt file, missing directory, newer schema, disk full); its
small calls on the event loop's own connection (controller.store.sqlite_loop): they run there
without a thread hop, never wait for the write lock (the worker thread takes the call
instead), wake event waiters like the worker's writes, and leave checkpoints to the worker so
the log stays bounded. The semantics both stores share are tested against both in
test_store_contract.py."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time

import pytest

from controller.store.base import Store
from controller.store.claims import StatusRefused
from controller.store.sqlite import SqliteStore
from controller.store.sqlite_loop import BUSY, CHECKPOINT_EVERY
from controller.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION, migrate
from margo_stream.errors import StoreError
from margo_stream.state.digest import sha256_digest
from tests.unit.test_store_contract import manifest, status

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "controller.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def device(store: SqliteStore) -> SqliteStore:
    """The store with one device, acme/d1."""
    await store.device_connected(
        "acme", "d1", capabilities={}, reported_labels=None, manifest_version=None, remote="x"
    )
    return store


async def test_implements_the_interface_and_sets_pragmas(store: SqliteStore, tmp_path) -> None:
    assert isinstance(store, Store)
    conn = sqlite3.connect(tmp_path / "controller.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


async def test_all_sqlite_calls_run_on_one_worker_thread(store: SqliteStore) -> None:
    threads: set[str] = set()

    def probe(conn) -> None:
        threads.add(threading.current_thread().name)

    await asyncio.gather(*(store._read(probe) for _ in range(20)))
    assert len(threads) == 1
    assert threads.pop().startswith("margo-store")
    assert threading.current_thread().name not in threads


async def test_migration_records_what_old_manifests_issued(tmp_path) -> None:
    """A database of schema 6 (manifests stored before issued deployments were recorded):
    the upgrade reads every stored manifest, so its devices' honest reports stay accepted."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, str(path), MIGRATIONS[:6])
    conn.execute("INSERT INTO devices (tenant, device_id, first_seen) VALUES ('acme', 'd1', 1)")
    rows = [(1, manifest("web")), (2, manifest("web", "db")), (3, b"not json"), (4, manifest())]
    for version, data in rows:
        conn.execute(
            "INSERT INTO manifests (tenant, device_id, version, manifest, signature, created)"
            " VALUES ('acme', 'd1', ?, ?, x'00', 1)",
            (version, data),
        )
    conn.close()
    async with SqliteStore(path) as s:
        assert await s.put_status("acme", "d1", status("web", 1), 1)
        assert await s.put_status("acme", "d1", status("db", 4), 2)
        with pytest.raises(StatusRefused):
            await s.put_status("acme", "d1", status("db", 1), 3)
        with pytest.raises(StatusRefused):
            await s.put_status("acme", "d1", status("web", 5), 3)
        assert len(await s.list_statuses("acme")) == 2


async def test_corrupt_database_names_the_file(tmp_path) -> None:
    path = tmp_path / "broken.db"
    path.write_bytes(b"this is not a sqlite database at all" * 200)
    store = SqliteStore(path)
    with pytest.raises(StoreError) as err:
        await store.open()
    assert str(path) in str(err.value) and "corrupt" in str(err.value)


async def test_missing_directory_and_newer_schema(tmp_path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        await SqliteStore(tmp_path / "nope" / "c.db").open()
    path = tmp_path / "future.db"
    async with SqliteStore(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 999")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        await SqliteStore(path).open()


async def test_disk_full_is_a_store_error(store: SqliteStore) -> None:
    def cap(conn) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")

    await store._read(cap)
    with pytest.raises(StoreError) as err:
        await store.put_blob("acme", b"x" * 1_000_000)
    assert "disk full" in str(err.value) and store.path in str(err.value)
    assert not await store.has_blob("acme", sha256_digest(b"x" * 1_000_000))


# -- small calls on the loop's own connection ---------------------------------------------


async def test_small_reads_and_writes_run_on_the_loops_thread(device: SqliteStore) -> None:
    threads: set[str] = set()

    def probe(conn: sqlite3.Connection) -> int:
        threads.add(threading.current_thread().name)
        return int(conn.execute("SELECT count(*) FROM devices").fetchone()[0])

    assert await device._read_small(probe) == 1
    assert await device._write_small(probe) == 1
    assert threads == {threading.current_thread().name}
    assert device._here is not None
    before = device._here.writes
    await device.put_manifests("acme", [("d1", 1, manifest("web"), b"sig")])
    assert await device.put_status_batch([("acme", "d1", status("web", 1), 1)]) == [True]
    assert device._here.writes == before + 2  # both written on the loop's connection
    assert (await device.latest_manifests("acme", ["d1"]))["d1"].version == 1
    assert (await device.get_device("acme", "d1")).device_id == "d1"


async def test_a_held_write_lock_sends_the_write_to_the_worker_without_blocking_the_loop(
    device: SqliteStore,
) -> None:
    """Another connection holds the write lock for 0.3 s: the loop's connection answers BUSY
    at once, the store's call waits on the worker thread, and the loop keeps turning."""
    other = sqlite3.connect(device.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    assert device._here is not None
    started = time.monotonic()
    assert device._here.write(lambda conn: conn.execute("SELECT 1")) is BUSY
    assert time.monotonic() - started < 0.05

    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    threading.Timer(0.3, lambda: (other.execute("COMMIT"), other.close())).start()
    try:
        await device.put_manifests("acme", [("d1", 1, manifest("web"), b"sig")])
    finally:
        ticker.cancel()
    assert time.monotonic() - started >= 0.25
    assert ticks >= 10  # the loop was free while the write waited for the lock
    assert (await device.latest_manifest("acme", "d1")) is not None


async def test_calls_from_another_thread_go_to_the_worker(device: SqliteStore) -> None:
    assert device._here is not None
    seen: list[object] = []
    worker = threading.Thread(target=lambda: seen.append(device._here.read(lambda c: 1)))  # type: ignore[union-attr]
    worker.start()
    worker.join()
    assert seen == [BUSY]


async def test_a_failed_write_on_the_loop_leaves_nothing(device: SqliteStore) -> None:
    def half(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE devices SET labels = '{\"a\": \"b\"}' WHERE device_id = 'd1'")
        raise LookupError("stop")

    with pytest.raises(LookupError):
        await device._write_small(half)
    assert (await device.get_device("acme", "d1")).labels == {}


async def test_events_of_a_loop_write_wake_waiters(device: SqliteStore) -> None:
    after = await device.latest_event_id("acme")
    waiter = asyncio.create_task(device.wait_events("acme", after, timeout=5.0))
    await asyncio.sleep(0.05)
    await device.put_manifests("acme", [("d1", 1, manifest("web"), b"sig")])
    started = time.monotonic()
    assert await device.put_status_batch([("acme", "d1", status("web", 1), 1)]) == [True]
    await asyncio.wait_for(waiter, 2.0)
    assert time.monotonic() - started < 1.0
    assert await device.latest_event_id("acme") > after


async def test_the_worker_checkpoints_for_the_loops_writes(device: SqliteStore) -> None:
    """The loop's connection never checkpoints; every CHECKPOINT_EVERY of its writes the
    worker does, so the log is reused instead of growing with every write."""
    wal = device.path + "-wal"
    writes = CHECKPOINT_EVERY * 5
    per_write = 0.0
    for version in range(1, writes + 1):
        await device.put_manifests("acme", [("d1", version, manifest("web"), b"s" * 2000)])
        if version == 50:
            per_write = os.path.getsize(wal) / 50  # no checkpoint yet: the log's growth a write
        if version % CHECKPOINT_EVERY == 0:
            await device._read(lambda conn: None)  # the worker has run the checkpoint
    size = os.path.getsize(wal)  # its high-water mark: a checkpointed log is written over
    assert per_write > 0
    assert size < per_write * CHECKPOINT_EVERY * 1.5, f"log of {size} bytes after {writes} writes"
