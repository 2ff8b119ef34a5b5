"""What only the SQLite store does, on real database files: WAL and one worker thread, its
migrations, and its errors (corrupt file, missing directory, newer schema, disk full). The
semantics both stores share are tested against both in test_store_contract.py."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from controller.store.base import Store
from controller.store.claims import StatusRefused
from controller.store.sqlite import SqliteStore
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
