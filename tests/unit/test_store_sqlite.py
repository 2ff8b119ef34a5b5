"""The SQLite store against real database files: tenant scoping, dedup, batches, errors."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading

import pytest

from controller.store.base import DeploymentDraft, Store
from controller.store.claims import NOT_ISSUED, UNKNOWN_VERSION, StatusRefusal, StatusRefused
from controller.store.sqlite import SqliteStore
from controller.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION, migrate
from margo_stream.errors import NotFound, StoreError
from margo_stream.state.digest import sha256_digest

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


async def connect(store: SqliteStore, tenant: str, device: str, now: float = 100.0, **kw):
    return await store.device_connected(
        tenant,
        device,
        capabilities=kw.get("capabilities", {"id": device, "cpus": [{"cores": 4}]}),
        reported_labels=kw.get("reported_labels", {}),
        manifest_version=kw.get("manifest_version"),
        remote=kw.get("remote", "127.0.0.1:5000"),
        now=now,
    )


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


async def test_device_lifecycle(store: SqliteStore) -> None:
    rec = await connect(
        store, "acme", "dev-1", now=100.0, reported_labels={"site": "a"}, manifest_version=3
    )
    assert rec.connected and rec.connection_count == 1 and rec.first_seen == 100.0
    assert rec.capabilities["cpus"] == [{"cores": 4}] and rec.manifest_version == 3
    await store.device_disconnected("acme", "dev-1", 150.0)
    rec = await connect(store, "acme", "dev-1", now=200.0, reported_labels={"line": "2"})
    assert rec.connection_count == 2 and rec.first_seen == 100.0 and rec.last_seen == 200.0
    # the device's claim replaces its reported labels and never reaches the operator's
    assert rec.reported_labels == {"line": "2"} and rec.labels == {}

    await store.touch_devices([("acme", "dev-1", 250.0), ("acme", "dev-1", 240.0)])
    assert (await store.get_device("acme", "dev-1")).last_seen == 250.0
    await store.set_labels("acme", "dev-1", {"site": "b"})
    await store.set_device_stats("acme", "dev-1", {"bufferFill": 0.25, "dropped": 7})
    rec = await store.get_device("acme", "dev-1")
    assert rec.labels == {"site": "b"} and rec.stats == {"bufferFill": 0.25, "dropped": 7}
    assert rec.reported_labels == {"line": "2"}

    assert await store.mark_all_disconnected() == 1
    assert not (await store.get_device("acme", "dev-1")).connected
    kinds = [e.kind for e in await store.list_events("acme")]
    assert kinds == ["device.connected", "device.disconnected", "device.connected", "device.labels"]


async def test_tenant_scoping(store: SqliteStore) -> None:
    await connect(store, "acme", "shared-id")
    await connect(store, "globex", "only-globex")
    assert [d.device_id for d in await store.list_devices("acme")] == ["shared-id"]
    with pytest.raises(NotFound) as other:
        await store.get_device("acme", "only-globex")
    with pytest.raises(NotFound) as missing:
        await store.get_device("acme", "nowhere")
    assert str(other.value).replace("only-globex", "X") == str(missing.value).replace(
        "nowhere", "X"
    )
    for call in (
        store.set_labels("acme", "only-globex", {}),
        store.set_device_stats("acme", "only-globex", {}),
        store.device_disconnected("acme", "only-globex"),
        store.ingest_telemetry("acme", "only-globex", [(1, "m", b"{}")]),
        store.query_telemetry("acme", "only-globex"),
        store.put_status("acme", "only-globex", {"deploymentId": "d"}, 1),
    ):
        with pytest.raises(NotFound):
            await call
    await store.add_event("globex", "custom")
    assert all(e.tenant == "acme" for e in await store.list_events("acme"))
    digest = await store.put_blob("globex", b"secret")
    assert not await store.has_blob("acme", digest)
    with pytest.raises(NotFound):
        await store.get_blob("acme", digest)


async def test_desired_state_tables(store: SqliteStore) -> None:
    await connect(store, "acme", "d1")
    await connect(store, "acme", "d2")
    doc = b"metadata: {name: app}\n"
    dep = await store.put_deployment("acme", "app", document=doc, name="app", profile="compose")
    assert dep.digest == sha256_digest(doc)
    assert await store.get_blob("acme", dep.digest) == doc
    assert await store.missing_blobs("acme", [dep.digest, "sha256:" + "0" * 64]) == [
        "sha256:" + "0" * 64
    ]
    with pytest.raises(ValueError):
        await store.put_blob("acme", b"x", digest="sha256:" + "1" * 64)

    v2 = await store.put_deployment(
        "acme", "app", document=doc + b"# v2\n", name="app", profile="compose", now=2e9
    )
    assert (await store.get_deployment("acme", "app")).digest == v2.digest
    await store.put_deployment(
        "acme", "app", document=doc, name="app", profile="compose", now=3e9
    )  # re-applying v1 makes it the newest again
    assert (await store.get_deployment("acme", "app")).digest == dep.digest
    assert [d.digest for d in await store.list_deployments("acme")] == [dep.digest]
    await store.assign("acme", ["d1", "d2"], "app", dep.digest)
    assert [a.device_id for a in await store.list_assignments("acme")] == ["d1", "d2"]
    with pytest.raises(NotFound):  # one unknown device: nothing of the batch is written
        await store.assign("acme", ["d1", "ghost"], "app", dep.digest)
    with pytest.raises(NotFound):
        await store.assign("acme", "d1", "app", "sha256:" + "2" * 64)
    await store.unassign("acme", "d2", "app")
    with pytest.raises(NotFound):
        await store.unassign("acme", "d2", "app")
    assert [a.device_id for a in await store.list_assignments("acme", "d2")] == []

    assert await store.latest_manifest("acme", "d1") is None
    await store.put_manifest("acme", "d1", 1, b"m1", b"s1")
    await store.put_manifest("acme", "d1", 2, b"m2", b"s2")
    with pytest.raises(ValueError):
        await store.put_manifest("acme", "d1", 2, b"again", b"s")
    latest = await store.latest_manifest("acme", "d1")
    assert latest is not None and (latest.version, latest.manifest) == (2, b"m2")
    assert await store.latest_manifest("globex", "d1") is None


async def test_apply_is_one_transaction_with_one_event(store: SqliteStore) -> None:
    await connect(store, "acme", "d1")
    await connect(store, "acme", "d2")
    before = await store.latest_event_id("acme")
    drafts = [
        DeploymentDraft(
            deployment_id=f"dep-{i}", document=f"doc {i}".encode(), name="n", profile="p"
        )
        for i in range(3)
    ]
    # an unknown target device: nothing of the apply is stored (no blob, no deployment, no
    # assignment, no event), although it fails only after the deployments were written
    with pytest.raises(NotFound, match="nope"):
        await store.apply("acme", blobs=[b"file"], deployments=drafts, devices=["d1", "nope"])
    assert not await store.has_blob("acme", sha256_digest(b"file"))
    assert await store.list_deployments("acme") == []
    assert await store.list_assignments("acme") == []
    assert await store.latest_event_id("acme") == before

    records = await store.apply("acme", blobs=[b"file"], deployments=drafts, devices=["d1", "d2"])
    assert [r.deployment_id for r in records] == ["dep-0", "dep-1", "dep-2"]
    assert await store.has_blob("acme", sha256_digest(b"file"))
    assert len(await store.list_assignments("acme")) == 6
    events = await store.list_events("acme", before, 100)
    assert [e.kind for e in events] == ["deployment.applied"]
    assert events[0].payload["changed"] == ["d1", "d2"]
    # the same apply again changes nothing, and says so
    await store.apply("acme", blobs=[], deployments=drafts, devices=["d1", "d2"])
    events = await store.list_events("acme", before, 100)
    assert events[-1].payload["changed"] == []


def manifest(*deployment_ids: str) -> bytes:
    """A manifest's bytes as far as the store reads them: the deployments it lists."""
    return json.dumps({"deployments": [{"deploymentId": d} for d in deployment_ids]}).encode()


def status(deployment_id: str, version: int | None, state: str = "installed") -> dict:
    return {
        "deploymentId": deployment_id,
        "adoptedManifestVersion": version,
        "status": {"state": state},
        "components": [],
    }


async def test_status_dedup_by_seq(store: SqliteStore) -> None:
    await connect(store, "acme", "d1")
    await store.put_manifest("acme", "d1", 1, manifest("app", "b"), b"s")
    installing = {**status("app", 1), "status": {"state": "installing"}}
    installed = status("app", 1)
    assert await store.put_status("acme", "d1", installing, 1)
    assert await store.put_status("acme", "d1", installed, 2)
    assert not await store.put_status("acme", "d1", installing, 1)  # retransmission
    assert not await store.put_status("acme", "d1", installed, 2)
    [st] = await store.list_statuses("acme", "d1")
    assert st.status["status"]["state"] == "installed" and st.seq == 2
    stored = await store.put_statuses(
        "acme", "d1", [({**status("b", 1), "status": {"state": "pending"}}, 3), (installed, 2)]
    )
    assert stored == 1
    assert len(await store.list_statuses("acme")) == 2
    assert await store.list_statuses("globex") == []
    changes = [e.payload for e in await store.list_events("acme") if e.kind == "deployment.status"]
    assert [c["state"] for c in changes] == ["installing", "installed", "pending"]


async def test_status_claims_only_what_was_issued(store: SqliteStore) -> None:
    """A device reports on deployments and versions the controller issued to it, nothing
    else: a made-up version, a deployment never in one of its manifests (or only in a later
    one, or another device's) is refused and nothing is stored; a deployment removed since
    (its ``removed`` report carries the version that dropped it) is still accepted."""
    await connect(store, "acme", "d1")
    await connect(store, "acme", "d2")
    await connect(store, "globex", "d1")
    await store.put_manifest("acme", "d1", 1, manifest("web"), b"s")
    await store.put_manifest("acme", "d1", 2, manifest("web", "db"), b"s")
    await store.put_manifest("acme", "d1", 3, manifest("db"), b"s")  # web removed
    await store.put_manifest("acme", "d2", 1, manifest("cache"), b"s")
    events = await store.latest_event_id("acme")

    refused = [
        (status("web", 999999), UNKNOWN_VERSION),
        (status("web", 0), UNKNOWN_VERSION),
        (status("web", None), UNKNOWN_VERSION),
        (status("web", 2**70), UNKNOWN_VERSION),
        ({**status("web", 1), "adoptedManifestVersion": "1"}, UNKNOWN_VERSION),
        (status("cache", 1), NOT_ISSUED),  # d2's deployment
        (status("ghost", 3), NOT_ISSUED),
        (status("db", 1), NOT_ISSUED),  # issued only from version 2 on
    ]
    for doc, reason in refused:
        with pytest.raises(StatusRefused) as err:
            await store.put_status("acme", "d1", doc, 5)
        assert err.value.refusal.reason == reason
        assert err.value.refusal.deployment_id == doc["deploymentId"]
    with pytest.raises(StatusRefused):  # globex/d1 was issued nothing
        await store.put_status("globex", "d1", status("web", 1), 5)
    with pytest.raises(StatusRefused):  # a batch with one bad claim is refused whole
        await store.put_statuses("acme", "d1", [(status("db", 2), 5), (status("x", 2), 6)])
    assert await store.list_statuses("acme") == [] and await store.list_statuses("globex") == []
    assert await store.latest_event_id("acme") == events  # not even an event

    assert await store.put_status("acme", "d1", status("web", 1), 1)
    assert await store.put_status("acme", "d1", status("db", 2, "installing"), 2)
    assert await store.put_status("acme", "d1", status("web", 3, "removed"), 3)
    results = await store.put_status_batch(
        [
            ("acme", "d1", status("db", 3), 4),
            ("acme", "d2", status("web", 1), 4),  # d2 was never issued web
            ("acme", "d2", status("cache", 7), 4),  # nor version 7
            ("acme", "nobody", status("web", 1), 4),
        ]
    )
    assert results[0] is True and results[3] is False
    assert isinstance(results[1], StatusRefusal) and results[1].reason == NOT_ISSUED
    assert isinstance(results[2], StatusRefusal) and results[2].claimed_version == 7
    got = {(r.device_id, r.deployment_id): r.status for r in await store.list_statuses("acme")}
    assert set(got) == {("d1", "web"), ("d1", "db")}
    assert got["d1", "web"]["status"]["state"] == "removed"


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


async def test_telemetry_dedup_watermark_and_gaps(store: SqliteStore) -> None:
    await connect(store, "acme", "d1")
    assert await store.telemetry_watermark("acme", "d1") == 0
    batch = [(seq, "metrics", b'{"v": %d}' % seq) for seq in range(1, 6)]
    assert await store.ingest_telemetry("acme", "d1", batch) == 5
    assert await store.ingest_telemetry("acme", "d1", batch[2:]) == 5  # duplicates ignored
    assert await store.ingest_telemetry("acme", "d1", [(8, "logs", b"x")]) == 5  # hole at 6..7
    assert await store.record_gap("acme", "d1", 6, 7) == 8
    assert await store.ingest_telemetry("acme", "d1", [(9, "metrics", b"y")]) == 9
    assert await store.telemetry_watermark("acme", "d1") == 9
    gaps = [e.payload for e in await store.list_events("acme") if e.kind == "telemetry.gap"]
    assert gaps == [{"first": 6, "last": 7, "count": 2}]

    rows = await store.query_telemetry("acme", "d1")
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5, 8, 9]
    assert [r.seq for r in await store.query_telemetry("acme", "d1", limit=2)] == [8, 9]
    assert [r.seq for r in await store.query_telemetry("acme", "d1", stream="logs")] == [8]
    assert [r.seq for r in await store.query_telemetry("acme", "d1", after_seq=3, limit=2)] == [
        4,
        5,
    ]


async def test_telemetry_first_batch_sets_the_starting_point(store: SqliteStore) -> None:
    await connect(store, "acme", "d1")
    assert await store.ingest_telemetry("acme", "d1", [(500, "m", b""), (501, "m", b"")]) == 501


async def test_telemetry_large_batch_is_one_transaction(store: SqliteStore) -> None:
    await connect(store, "acme", "d1")
    batch = [(seq, "m", b"p") for seq in range(1, 5001)]
    assert await store.ingest_telemetry("acme", "d1", batch) == 5000
    bad = [(5001, "m", b"p"), (0, "m", b"p")]
    with pytest.raises(ValueError):
        await store.ingest_telemetry("acme", "d1", bad)
    assert await store.telemetry_watermark("acme", "d1") == 5000
    assert [r.seq for r in await store.query_telemetry("acme", "d1", limit=1)] == [5000]


async def test_session_audits(store: SqliteStore) -> None:
    await connect(store, "acme", "d1")
    sid = await store.start_session_audit("acme", "d1", operator="ops", command="/bin/sh", now=10)
    await store.finish_session_audit(sid, bytes_in=5, bytes_out=50, reason="exit 0", now=12)
    with pytest.raises(NotFound):
        await store.finish_session_audit(sid, tenant="globex")
    [audit] = await store.list_session_audits("acme")
    assert (audit.id, audit.ended_at, audit.bytes_out, audit.reason) == (sid, 12, 50, "exit 0")
    assert await store.list_session_audits("globex") == []


async def test_wait_events_wakes_on_commit(store: SqliteStore) -> None:
    first = await store.add_event("acme", "a")
    assert await store.wait_events("acme", first, timeout=0.01) == []

    async def later() -> None:
        await asyncio.sleep(0)
        await store.add_event("globex", "other-tenant")
        await store.add_event("acme", "b", payload={"n": 1})

    task = asyncio.create_task(later())
    got = await store.wait_events("acme", first, timeout=5)
    await task
    assert [(e.kind, e.payload) for e in got] == [("b", {"n": 1})]


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


async def test_data_survives_reopen(tmp_path) -> None:
    path = tmp_path / "c.db"
    async with SqliteStore(path) as s:
        await connect(s, "acme", "d1")
        await s.ingest_telemetry("acme", "d1", [(1, "m", b"a")])
    async with SqliteStore(path) as s:
        assert (await s.get_device("acme", "d1")).connection_count == 1
        assert await s.telemetry_watermark("acme", "d1") == 1


async def test_concurrent_callers_are_serialised(store: SqliteStore) -> None:
    devices = [f"dev-{i}" for i in range(40)]
    await asyncio.gather(*(connect(store, "acme", d) for d in devices))
    marks = await asyncio.gather(
        *(
            store.ingest_telemetry("acme", d, [(s, "m", b"{}") for s in range(1, 51)])
            for d in devices
        )
    )
    assert marks == [50] * len(devices)
    assert len(await store.list_devices("acme")) == len(devices)
