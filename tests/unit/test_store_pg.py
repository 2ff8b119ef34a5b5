"""What only the PostgreSQL store does, on a private server (tests/pg_server.py): migrations
racing at start (in one process and between processes), errors that name the database without
its password, several stores (controllers) on one database: their events wake each other's
waiters and reach every reader in order, their ingests of one device store each record once.
The shared semantics are in test_store_contract.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from controller.store.base import VersionConflict
from controller.store.pg import PgStore
from controller.store.pg_errors import redact_dsn
from controller.store.pg_schema import SCHEMA_VERSION
from margo_stream.errors import StoreError

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def connect(store: PgStore, tenant: str, device: str) -> None:
    await store.device_connected(
        tenant, device, capabilities={}, reported_labels={}, manifest_version=None, remote="t"
    )


async def applied_versions(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch("SELECT version FROM schema_version ORDER BY 1")]
    finally:
        await conn.close()


def test_redact_dsn() -> None:
    assert redact_dsn("postgresql://u:hunter2@db.example:5433/fleet?sslmode=require") == (
        "postgresql://u@db.example:5433/fleet?sslmode=require"
    )
    assert redact_dsn("postgres://[::1]/x?password=hunter2&application_name=a") == (
        "postgres://[::1]/x?application_name=a"
    )
    assert redact_dsn("postgresql://u@h/db") == "postgresql://u@h/db"


async def test_migrations_racing_in_one_process(pg_dsn: str) -> None:
    stores = [PgStore(pg_dsn) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert await applied_versions(pg_dsn) == list(range(1, SCHEMA_VERSION + 1))
        await connect(stores[0], "acme", "d1")
        assert (await stores[3].get_device("acme", "d1")).connection_count == 1
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    async with PgStore(pg_dsn):  # a later start finds the schema current
        pass
    assert await applied_versions(pg_dsn) == list(range(1, SCHEMA_VERSION + 1))


def test_migrations_racing_between_processes(pg_dsn: str) -> None:
    """Controllers started at once on an empty database: every one of them opens, and each
    migration is applied exactly once."""
    script = (
        "import asyncio, sys\n"
        "from controller.store.pg import PgStore\n"
        "async def main():\n"
        "    async with PgStore(sys.argv[1]) as s:\n"
        "        await s.add_event('acme', 'started')\n"
        "asyncio.run(main())\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, pg_dsn],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert asyncio.run(applied_versions(pg_dsn)) == list(range(1, SCHEMA_VERSION + 1))


async def test_errors_name_the_database_without_its_password(pg, pg_dsn: str) -> None:
    closed = PgStore(f"postgresql://margo:hunter2@127.0.0.1:{_closed_port()}/db")
    with pytest.raises(StoreError) as err:
        await closed.open()
    text = str(err.value)
    assert "hunter2" not in text and "postgresql://margo@127.0.0.1:" in text
    assert "opening the store: connection failed" in text
    missing = pg.dsn("no_such_db").replace("margo@", "margo:hunter2@")
    with pytest.raises(StoreError, match="does not exist") as err:
        await PgStore(missing).open()
    assert "hunter2" not in str(err.value)
    with pytest.raises(StoreError, match="not open"):
        await PgStore(pg_dsn).list_devices("acme")


async def test_newer_schema_is_refused(pg_dsn: str) -> None:
    async with PgStore(pg_dsn):
        pass
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("INSERT INTO schema_version VALUES (999, 0)")
    await conn.close()
    with pytest.raises(StoreError, match="newer"):
        await PgStore(pg_dsn).open()


async def test_a_value_postgresql_refuses_is_a_value_error(pg_dsn: str) -> None:
    async with PgStore(pg_dsn) as store:
        await connect(store, "acme", "d1")
        with pytest.raises(ValueError, match="ingest telemetry"):
            await store.ingest_telemetry("acme", "d1", [(1, "m", b"a"), (2, "bad\x00", b"b")])
        assert await store.telemetry_watermark("acme", "d1") == 0
        assert await store.telemetry_usage() == {}
        # the device's JSON documents keep any string (escaped)
        rec = await store.device_connected(
            "acme", "d1", capabilities={"x": "\x00"}, reported_labels=None,
            manifest_version=None, remote="t",
        )  # fmt: skip
        assert rec.capabilities == {"x": "\x00"}


async def _cut(pg, dsn: str, *, allow: bool | None = None) -> None:
    """Terminate every connection to the database of ``dsn`` (and let new ones in or not)."""
    name = dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg.dsn("postgres"))
    try:
        if allow is not None:
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {str(allow).lower()}")
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
    finally:
        await admin.close()


async def test_lost_connections_are_replaced_and_a_dead_server_is_a_store_error(
    pg, pg_dsn: str
) -> None:
    async with PgStore(pg_dsn) as store:
        await connect(store, "acme", "d1")
        await asyncio.gather(*(store.get_device("acme", "d1") for _ in range(10)))  # full pool
        # the server closes every pooled connection: the next calls (reads, and writes whose
        # transaction had not begun) go through on new ones
        await _cut(pg, pg_dsn)
        for _ in range(12):
            assert (await store.get_device("acme", "d1")).device_id == "d1"
        await _cut(pg, pg_dsn)
        for i in range(12):
            await store.set_device_stats("acme", "d1", {"i": i})
        # no connection possible: a StoreError naming the call and the database
        await _cut(pg, pg_dsn, allow=False)
        try:
            with pytest.raises(StoreError) as err:
                await store.get_device("acme", "d1")
            assert store.path in str(err.value) and "get device" in str(err.value)
        finally:
            await _cut(pg, pg_dsn, allow=True)
        assert (await store.get_device("acme", "d1")).stats == {"i": 11}


async def test_events_of_another_controller_wake_waiters(pg_dsn: str) -> None:
    async with PgStore(pg_dsn) as a, PgStore(pg_dsn) as b:
        for _ in range(100):  # both listeners are connected shortly after open
            if a._listening and b._listening:
                break
            await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()

        async def later() -> int:
            await asyncio.sleep(0.1)
            return await b.add_event("acme", "from-b")

        task = asyncio.create_task(later())
        started = loop.time()
        got = await a.wait_events("acme", 0, timeout=20)
        assert [e.kind for e in got] == ["from-b"] and got[0].id == await task
        assert loop.time() - started < 0.9  # the notification, not a catch-up read


async def test_every_reader_sees_every_event_in_order(pg_dsn: str) -> None:
    """Writers on two stores append events at once; a reader following the feed by cursor
    (as the API's event stream does) misses none: one tenant's ids commit in order."""
    async with PgStore(pg_dsn) as a, PgStore(pg_dsn) as b:
        await connect(a, "acme", "d1")
        written: list[int] = []

        await a.put_manifest("acme", "d1", 1, b'{"deployments": [{"deploymentId": "app"}]}', b"s")
        seqs = iter(range(1, 10_000))

        async def writer(store: PgStore, n: int) -> None:
            for i in range(n):
                written.append(await store.add_event("acme", "w", payload={"i": i}))
                # and every other way of appending events: a transaction that writes other
                # rows too, and the one-statement writes (a connection, a status)
                if i % 5 == 0:
                    await store.set_labels("acme", "d1", {"i": str(i)})
                elif i % 5 == 1:
                    await connect(store, "acme", "d1")
                elif i % 5 == 2:
                    state = ("installing", "installed")[i % 2]
                    doc = {"deploymentId": "app", "adoptedManifestVersion": 1, "state": state}
                    await store.put_status_batch([("acme", "d1", doc, next(seqs))])

        seen: list[int] = []
        done = asyncio.Event()

        async def reader() -> None:
            cursor = 0
            while True:
                finished = done.is_set()
                batch = await b.list_events("acme", cursor, 1000)
                seen.extend(e.id for e in batch)
                cursor = batch[-1].id if batch else cursor
                if finished and not batch:
                    return
                await asyncio.sleep(0)

        read = asyncio.create_task(reader())
        await asyncio.gather(*(writer(s, 40) for s in (a, b, a, b)))
        done.set()
        await read
        assert seen == sorted(seen)
        assert set(written) <= set(seen)
        assert seen == [e.id for e in await a.list_events("acme", 0, 10_000)]


async def test_two_controllers_ingest_one_device_exactly_once(pg_dsn: str) -> None:
    """During a failover both controllers may store the same device's retransmissions: each
    record is stored once, the byte count is exact and the watermark never moves back."""
    async with PgStore(pg_dsn) as a, PgStore(pg_dsn) as b:
        await connect(a, "acme", "d1")
        batches = [[(s, "m", b"x" * 10) for s in range(start, start + 50)] for start in (1, 26)]
        marks = await asyncio.gather(
            *(
                store.ingest_telemetry("acme", "d1", batch)
                for _ in range(5)
                for store in (a, b)
                for batch in batches
            )
        )
        assert max(marks) == 75 and await a.telemetry_watermark("acme", "d1") == 75
        rows = await b.query_telemetry("acme", "d1", since=0, limit=1000)
        assert [r.seq for r in rows] == list(range(1, 76))
        assert await a.telemetry_usage() == {"acme": 750}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_store_option(tmp_path) -> None:
    from controller.cli import build_parser, config_from_args
    from controller.config import ControllerConfig
    from controller.store.factory import open_store
    from controller.store.sqlite import SqliteStore
    from margo_stream.errors import ConfigError

    base = ["--certs", str(tmp_path), "--data", str(tmp_path)]
    config = config_from_args(build_parser().parse_args(base))
    assert config.store is None and isinstance(open_store(config), SqliteStore)
    dsn = "postgresql://margo:secret@127.0.0.1:5432/fleet"
    config = config_from_args(build_parser().parse_args([*base, "--store", dsn]))
    store = open_store(config)
    assert isinstance(store, PgStore) and store.path == "postgresql://margo@127.0.0.1:5432/fleet"
    assert isinstance(open_store(config.model_copy(update={"store": "postgres://h/db"})), PgStore)
    for bad in ("mysql://h/db", "/var/lib/margo.db", "PostgreSQL:/x", ""):
        with pytest.raises(ConfigError, match="postgresql://USER"):
            ControllerConfig(certs=tmp_path, data=tmp_path, store=bad)


async def test_two_controllers_storing_one_devices_next_manifest_one_wins(pg_dsn: str) -> None:
    """Each builds version N+1 from what it read; the devices' row lock lets one store it and
    the other learn (VersionConflict) that it must read again, never two version N+1."""
    a, b = PgStore(pg_dsn), PgStore(pg_dsn)
    await a.open()
    await b.open()
    try:
        await connect(a, "acme", "race")
        results = await asyncio.gather(
            *(
                s.put_manifests("acme", [("race", 1, b"m-" + s_name, b"sig")], now=1.0)
                for s, s_name in ((a, b"a"), (b, b"b"))
            ),
            return_exceptions=True,
        )
        conflicts = [r for r in results if isinstance(r, VersionConflict)]
        assert len(conflicts) == 1 and results.count(None) == 1, results
        assert "not above the latest (1)" in str(conflicts[0])
        latest = await b.latest_manifest("acme", "race")
        assert latest is not None and latest.version == 1
    finally:
        await a.close()
        await b.close()
