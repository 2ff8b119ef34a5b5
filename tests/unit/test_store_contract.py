"""The store's contract, run against both stores: SQLite on a real file and PostgreSQL on a
private server (tests/pg_server.py, a fresh database per test). Every ``Store`` method's
semantics: devices, labels, the allow-list, blobs, applies (one transaction), assignments,
manifests and what they issued, statuses (claims refused), telemetry exactly once (duplicates,
gaps, the watermark), queries, terminal audits, the event feed, and retention's deletions.
What only one store does is tested beside it (test_store_sqlite.py, test_store_pg.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from controller.retention import RetentionPolicy, retention_pass
from controller.store.base import (
    IDENTITY_ALLOWED,
    IDENTITY_REVOKED,
    DeploymentDraft,
    Store,
    TelemetryRecord,
)
from controller.store.claims import NOT_ISSUED, UNKNOWN_VERSION, StatusRefusal, StatusRefused
from controller.store.pg import PgStore
from controller.store.sqlite import SqliteStore
from margo_stream.errors import NotFound
from margo_stream.state.digest import sha256_digest

pytestmark = pytest.mark.anyio

DAY = 86400.0
NOW = 1_000_000_000.0
KEY_A = "a" * 64
KEY_B = "b" * 64


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request, tmp_path):
    """A function making a new (unopened) store on the same database, each call."""
    if request.param == "sqlite":
        path = tmp_path / "controller.db"
        return lambda: SqliteStore(path)
    dsn = request.getfixturevalue("pg_dsn")
    return lambda: PgStore(dsn)


@pytest.fixture
async def store(make_store):
    s = make_store()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def connect(store: Store, tenant: str, device: str, now: float = 100.0, **kw):
    return await store.device_connected(
        tenant,
        device,
        capabilities=kw.get("capabilities", {"id": device, "cpus": [{"cores": 4}]}),
        reported_labels=kw.get("reported_labels", {}),
        manifest_version=kw.get("manifest_version"),
        remote=kw.get("remote", "127.0.0.1:5000"),
        now=now,
    )


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


async def all_telemetry(store: Store, tenant: str, devices: list[str]) -> list[TelemetryRecord]:
    rows: list[TelemetryRecord] = []
    for device in devices:
        rows += await store.query_telemetry(tenant, device, since=0, limit=1_000_000)
    return sorted(rows, key=lambda r: (r.received_at, r.device_id, r.seq))


# -- devices ---------------------------------------------------------------------------------


async def test_implements_the_interface(store: Store) -> None:
    assert isinstance(store, Store)
    for name in ("telemetry_usage", "prune_telemetry_before", "prune_telemetry_over"):
        assert callable(getattr(store, name))  # controller.retention.RetentionStore


async def test_device_lifecycle(store: Store) -> None:
    rec = await connect(
        store, "acme", "dev-1", now=100.0, reported_labels={"site": "a"}, manifest_version=3
    )
    assert rec.connected and rec.connection_count == 1 and rec.first_seen == 100.0
    assert rec.capabilities["cpus"] == [{"cores": 4}] and rec.manifest_version == 3
    assert rec.remote == "127.0.0.1:5000"
    await store.device_disconnected("acme", "dev-1", 150.0)
    rec = await store.get_device("acme", "dev-1")
    assert not rec.connected and rec.last_seen == 150.0
    rec = await connect(store, "acme", "dev-1", now=200.0, reported_labels={"line": "2"})
    assert rec.connection_count == 2 and rec.first_seen == 100.0 and rec.last_seen == 200.0
    # the device's claim replaces its reported labels and never reaches the operator's
    assert rec.reported_labels == {"line": "2"} and rec.labels == {}
    rec = await connect(store, "acme", "dev-1", now=210.0, reported_labels=None)
    assert rec.reported_labels == {"line": "2"}  # None keeps them

    await store.touch_devices([("acme", "dev-1", 250.0), ("acme", "dev-1", 240.0)])
    await store.touch_devices([("acme", "ghost", 260.0)])  # unknown devices are skipped
    assert (await store.get_device("acme", "dev-1")).last_seen == 250.0
    await store.set_labels("acme", "dev-1", {"site": "b"})
    await store.set_device_stats("acme", "dev-1", {"bufferFill": 0.25, "dropped": 7})
    rec = await store.get_device("acme", "dev-1")
    assert rec.labels == {"site": "b"} and rec.stats == {"bufferFill": 0.25, "dropped": 7}
    assert rec.reported_labels == {"line": "2"}

    assert await store.mark_all_disconnected() == 1
    assert not (await store.get_device("acme", "dev-1")).connected
    assert await store.mark_all_disconnected() == 0
    kinds = [e.kind for e in await store.list_events("acme")]
    assert kinds == [
        "device.connected",
        "device.disconnected",
        "device.connected",
        "device.connected",
        "device.labels",
    ]


async def test_labels(store: Store) -> None:
    await connect(store, "acme", "d1")
    await store.set_labels("acme", "d1", {"site": "a", "line": "1"})
    assert await store.update_labels("acme", "d1", {"line": None, "zone": "z"}) == {
        "site": "a",
        "zone": "z",
    }
    assert (await store.get_device("acme", "d1")).labels == {"site": "a", "zone": "z"}
    with pytest.raises(ValueError):
        await store.update_labels("acme", "d1", {"bad key!": "x"})
    with pytest.raises(ValueError):
        await store.set_labels("acme", "d1", {"bad key!": "x"})
    assert (await store.get_device("acme", "d1")).labels == {"site": "a", "zone": "z"}
    with pytest.raises(NotFound):
        await store.update_labels("acme", "ghost", {"a": "b"})
    payloads = [e.payload for e in await store.list_events("acme") if e.kind == "device.labels"]
    assert payloads[-1] == {"labels": {"site": "a", "zone": "z"}}


async def test_manifest_versions(store: Store) -> None:
    await connect(store, "acme", "d1")
    await connect(store, "acme", "d2")
    await store.set_manifest_version("acme", "d1", 4)
    with pytest.raises(NotFound):
        await store.set_manifest_version("acme", "ghost", 1)
    await store.set_manifest_versions([("acme", "d1", 5), ("acme", "ghost", 9), ("acme", "d2", 2)])
    assert (await store.get_device("acme", "d1")).manifest_version == 5
    assert (await store.get_device("acme", "d2")).manifest_version == 2


async def test_tenant_scoping(store: Store) -> None:
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
        store.record_gap("acme", "only-globex", 1, 2),
        store.telemetry_writer("acme", "only-globex"),
        store.put_status("acme", "only-globex", {"deploymentId": "d"}, 1),
    ):
        with pytest.raises(NotFound):
            await call
    assert await store.telemetry_watermark("acme", "only-globex") == 0
    await store.add_event("globex", "custom")
    assert all(e.tenant == "acme" for e in await store.list_events("acme"))
    digest = await store.put_blob("globex", b"secret")
    assert not await store.has_blob("acme", digest)
    with pytest.raises(NotFound):
        await store.get_blob("acme", digest)


# -- the allow-list --------------------------------------------------------------------------


async def test_identities_allow_revoke_import(store: Store) -> None:
    await store.allow_identity("acme", "d1", KEY_A, 5000.0, now=10.0)
    rec = await store.get_identity("acme", "d1")
    assert (rec.key_sha256, rec.state, rec.not_after, rec.updated) == (
        KEY_A,
        IDENTITY_ALLOWED,
        5000.0,
        10.0,
    )
    with pytest.raises(ValueError):
        await store.allow_identity("acme", "d2", "not-hex", 1.0)
    with pytest.raises(NotFound):
        await store.get_identity("globex", "d1")
    await store.revoke_identity("acme", "d1", now=20.0)
    await store.revoke_identity("acme", "d1", now=21.0)  # again: no second event
    assert (await store.get_identity("acme", "d1")).state == IDENTITY_REVOKED
    with pytest.raises(NotFound):
        await store.revoke_identity("acme", "ghost")

    changed = await store.import_identities(
        [
            ("acme", "d1", KEY_A, 9000.0, 30.0),  # same key, newer: stays revoked, later expiry
            ("acme", "d2", KEY_B, 7000.0, None),  # unknown: allowed
            ("globex", "g1", KEY_A, 6000.0, 5.0),
            ("acme", "d2", KEY_B, 7000.0, None),  # the same again: no change
        ],
        now=40.0,
    )
    assert [(r.tenant, r.device_id, r.state, r.not_after) for r in changed] == [
        ("acme", "d1", IDENTITY_REVOKED, 9000.0),
        ("acme", "d2", IDENTITY_ALLOWED, 7000.0),
        ("globex", "g1", IDENTITY_ALLOWED, 6000.0),
    ]
    # older than the record: ignored; another key: allowed again
    assert await store.import_identities([("acme", "d1", KEY_B, 1.0, 35.0)], now=50.0) == []
    [again] = await store.import_identities([("acme", "d1", KEY_B, 1.0, 45.0)], now=50.0)
    assert (again.key_sha256, again.state) == (KEY_B, IDENTITY_ALLOWED)
    assert [(r.tenant, r.device_id) for r in await store.list_identities()] == [
        ("acme", "d1"),
        ("acme", "d2"),
        ("globex", "g1"),
    ]
    kinds = [e.kind for e in await store.list_events("acme")]
    assert kinds == ["device.allowed", "device.revoked", "device.allowed", "device.allowed"]


# -- desired state ---------------------------------------------------------------------------


async def test_desired_state_tables(store: Store) -> None:
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
    assert await store.put_blob("acme", b"x", digest=sha256_digest(b"x")) == sha256_digest(b"x")
    with pytest.raises(ValueError):
        await store.put_deployment("acme", "", document=doc, name="n", profile="p")

    v2 = await store.put_deployment(
        "acme", "app", document=doc + b"# v2\n", name="app", profile="compose", now=2e9
    )
    assert (await store.get_deployment("acme", "app")).digest == v2.digest
    assert (await store.get_deployment("acme", "app", dep.digest)).digest == dep.digest
    with pytest.raises(NotFound):
        await store.get_deployment("acme", "nope")
    await store.put_deployment(
        "acme", "app", document=doc, name="app", profile="compose", now=3e9
    )  # re-applying v1 makes it the newest again
    assert (await store.get_deployment("acme", "app")).digest == dep.digest
    assert [d.digest for d in await store.list_deployments("acme")] == [dep.digest]
    await store.assign("acme", ["d1", "d2"], "app", dep.digest)
    assert [a.device_id for a in await store.list_assignments("acme")] == ["d1", "d2"]
    await store.assign("acme", "d1", "app", v2.digest)  # re-point
    assert [a.digest for a in await store.list_assignments("acme", "d1")] == [v2.digest]
    with pytest.raises(NotFound):  # one unknown device: nothing of the batch is written
        await store.assign("acme", ["d1", "ghost"], "app", dep.digest)
    assert [a.digest for a in await store.list_assignments("acme", "d1")] == [v2.digest]
    with pytest.raises(NotFound):
        await store.assign("acme", "d1", "app", "sha256:" + "2" * 64)
    await store.unassign("acme", "d2", "app")
    with pytest.raises(NotFound):
        await store.unassign("acme", "d2", "app")
    assert [a.device_id for a in await store.list_assignments("acme", "d2")] == []
    kinds = [e.kind for e in await store.list_events("acme") if e.kind.startswith("deployment")]
    assert kinds == ["deployment.assigned"] * 3 + ["deployment.unassigned"]


async def test_manifests(store: Store) -> None:
    await connect(store, "acme", "d1")
    await connect(store, "acme", "d2")
    assert await store.latest_manifest("acme", "d1") is None
    await store.put_manifest("acme", "d1", 1, b"m1", b"s1")
    await store.put_manifest("acme", "d1", 2, b"m2", b"s2")
    with pytest.raises(ValueError):
        await store.put_manifest("acme", "d1", 2, b"again", b"s")
    with pytest.raises(NotFound):
        await store.put_manifest("acme", "ghost", 1, b"m", b"s")
    latest = await store.latest_manifest("acme", "d1")
    assert latest is not None and (latest.version, latest.manifest, latest.signature) == (
        2,
        b"m2",
        b"s2",
    )
    assert await store.latest_manifest("globex", "d1") is None
    # a batch is all or nothing: d2's version 1 is not kept when d1's is refused
    with pytest.raises(ValueError):
        await store.put_manifests("acme", [("d2", 1, b"x", b"s"), ("d1", 1, b"x", b"s")])
    assert await store.latest_manifest("acme", "d2") is None
    with pytest.raises(NotFound):
        await store.put_manifests("acme", [("d2", 1, b"x", b"s"), ("ghost", 1, b"x", b"s")])
    await store.put_manifests("acme", [("d1", 3, b"m3", b"s"), ("d2", 1, b"n1", b"s")])
    got = await store.latest_manifests("acme", ["d1", "d2", "ghost"])
    assert {d: (m.version, m.manifest) for d, m in got.items()} == {
        "d1": (3, b"m3"),
        "d2": (1, b"n1"),
    }
    created = [e.payload for e in await store.list_events("acme") if e.kind == "manifest.created"]
    assert [c["manifestVersion"] for c in created] == [1, 2, 3, 1]


async def test_apply_is_one_transaction_with_one_event(store: Store) -> None:
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
    assert events[0].payload["devices"] == ["d1", "d2"]
    # the same apply again changes nothing, and says so
    await store.apply("acme", blobs=[], deployments=drafts, devices=["d1", "d2"])
    events = await store.list_events("acme", before, 100)
    assert events[-1].payload["changed"] == []
    # signatures: kept for the newest version re-applied unchanged
    signed = DeploymentDraft("dep-0", b"doc 0", "n", "p", signature='{"sig":1}', certificate="c")
    [rec] = await store.apply("acme", blobs=[], deployments=[signed], devices=[])
    assert rec.signature == '{"sig":1}' and rec.certificate == "c"
    resigned = DeploymentDraft("dep-0", b"doc 0", "n", "p", signature='{"sig":2}')
    [rec] = await store.apply("acme", blobs=[], deployments=[resigned], devices=[])
    assert rec.signature == '{"sig":1}'


# -- statuses --------------------------------------------------------------------------------


async def test_status_dedup_by_seq(store: Store) -> None:
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
    assert await store.put_statuses("acme", "d1", []) == 0
    assert len(await store.list_statuses("acme")) == 2
    assert await store.list_statuses("globex") == []
    with pytest.raises(ValueError):
        await store.put_status("acme", "d1", {"adoptedManifestVersion": 1}, 9)
    changes = [e.payload for e in await store.list_events("acme") if e.kind == "deployment.status"]
    assert [c["state"] for c in changes] == ["installing", "installed", "pending"]
    assert changes[1]["previous"] == "installing"
    # in one batch a later item sees what an earlier one stored
    results = await store.put_status_batch(
        [
            ("acme", "d1", {**status("app", 1), "status": {"state": "failed"}}, 10),
            ("acme", "d1", status("app", 1), 9),  # older than the item before it
            ("acme", "d1", status("app", 1), 11),
        ]
    )
    assert results == [True, False, True]
    [st] = [s for s in await store.list_statuses("acme", "d1") if s.deployment_id == "app"]
    assert st.seq == 11
    changes = [e.payload for e in await store.list_events("acme") if e.kind == "deployment.status"]
    assert [c["state"] for c in changes][-2:] == ["failed", "installed"]


async def test_status_claims_only_what_was_issued(store: Store) -> None:
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
        ({**status("web", 1), "adoptedManifestVersion": True}, UNKNOWN_VERSION),
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
    with pytest.raises(NotFound):
        await store.put_statuses("acme", "nobody", [(status("web", 1), 1)])


# -- telemetry -------------------------------------------------------------------------------


async def test_telemetry_dedup_watermark_and_gaps(store: Store) -> None:
    await connect(store, "acme", "d1")
    assert await store.telemetry_watermark("acme", "d1") == 0
    batch = [(seq, "metrics", b'{"v": %d}' % seq) for seq in range(1, 6)]
    assert await store.ingest_telemetry("acme", "d1", batch) == 5
    assert await store.ingest_telemetry("acme", "d1", batch[2:]) == 5  # duplicates ignored
    assert await store.ingest_telemetry("acme", "d1", []) == 5
    assert await store.ingest_telemetry("acme", "d1", [(8, "logs", b"x")]) == 5  # hole at 6..7
    assert await store.record_gap("acme", "d1", 6, 7) == 8
    assert await store.ingest_telemetry("acme", "d1", [(9, "metrics", b"y")]) == 9
    assert await store.telemetry_watermark("acme", "d1") == 9
    # a record that arrives after its gap was declared is stored, and moves nothing
    assert await store.ingest_telemetry("acme", "d1", [(7, "logs", b"late")]) == 9
    with pytest.raises(ValueError):
        await store.record_gap("acme", "d1", 5, 4)
    gaps = [e.payload for e in await store.list_events("acme") if e.kind == "telemetry.gap"]
    assert gaps == [{"first": 6, "last": 7, "count": 2}]

    rows = await store.query_telemetry("acme", "d1")
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5, 7, 8, 9]
    assert rows[0].payload == b'{"v": 1}' and rows[0].stream == "metrics"
    assert [r.seq for r in await store.query_telemetry("acme", "d1", limit=2)] == [8, 9]
    assert [r.seq for r in await store.query_telemetry("acme", "d1", stream="logs")] == [7, 8]
    assert [r.seq for r in await store.query_telemetry("acme", "d1", after_seq=3, limit=2)] == [
        4,
        5,
    ]


async def test_telemetry_out_of_order_batches(store: Store) -> None:
    """Records stored ahead of a hole count once the hole is filled."""
    await connect(store, "acme", "d1")
    assert await store.ingest_telemetry("acme", "d1", [(1, "m", b"a")]) == 1
    assert await store.ingest_telemetry("acme", "d1", [(4, "m", b"d"), (5, "m", b"e")]) == 1
    assert await store.ingest_telemetry("acme", "d1", [(3, "m", b"c"), (2, "m", b"b")]) == 5
    assert await store.record_gap("acme", "d1", 6, 6) == 6
    assert await store.record_gap("acme", "d1", 6, 9) == 9  # the same gap, extended
    # a batch with holes, one of them filled by an earlier batch, another still open
    assert await store.ingest_telemetry("acme", "d1", [(12, "m", b"l")]) == 9
    batch = [(s, "m", b"x") for s in (10, 11, 13, 14, 14, 16)]
    assert await store.ingest_telemetry("acme", "d1", batch) == 14
    assert await store.ingest_telemetry("acme", "d1", [(15, "m", b"o")]) == 16


async def test_telemetry_query_since(store: Store) -> None:
    await connect(store, "acme", "d1")
    for seq in range(1, 6):
        await store.ingest_telemetry("acme", "d1", [(seq, "m", b"p")], now=1000.0 + seq)
    rows = await store.query_telemetry("acme", "d1", since=1003.0, limit=2)
    assert [(r.seq, r.received_at) for r in rows] == [(3, 1003.0), (4, 1004.0)]
    assert await store.query_telemetry("acme", "d1", since=2000.0) == []


async def test_telemetry_first_batch_sets_the_starting_point(store: Store) -> None:
    await connect(store, "acme", "d1")
    assert await store.ingest_telemetry("acme", "d1", [(500, "m", b""), (501, "m", b"")]) == 501
    await connect(store, "acme", "d2")
    assert await store.record_gap("acme", "d2", 10, 19) == 19  # a first gap does as well
    assert await store.ingest_telemetry("acme", "d2", [(20, "m", b"")]) == 20


async def test_telemetry_large_batch_is_one_transaction(store: Store) -> None:
    await connect(store, "acme", "d1")
    batch = [(seq, "m", b"p") for seq in range(1, 5001)]
    assert await store.ingest_telemetry("acme", "d1", batch) == 5000
    bad = [(5001, "m", b"p"), (0, "m", b"p")]
    with pytest.raises(ValueError):
        await store.ingest_telemetry("acme", "d1", bad)
    assert await store.telemetry_watermark("acme", "d1") == 5000
    assert [r.seq for r in await store.query_telemetry("acme", "d1", limit=1)] == [5000]
    assert await store.telemetry_usage() == {"acme": 5000}


async def test_telemetry_writer(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.telemetry_writer("acme", "d1")
    await connect(store, "acme", "d1")
    writer = await store.telemetry_writer("acme", "d1")
    assert await writer.watermark() == 0
    assert await writer.ingest([(1, "m", b"a"), (2, "m", b"b")]) == 2
    assert await writer.ingest([(2, "m", b"b")]) == 2
    assert await writer.record_gap(3, 4) == 4
    assert await writer.ingest([(5, "m", b"c")]) == 5
    assert await writer.watermark() == 5
    assert [r.seq for r in await store.query_telemetry("acme", "d1")] == [1, 2, 5]
    kinds = [e.kind for e in await store.list_events("acme")]
    assert kinds.count("telemetry.gap") == 1


async def test_concurrent_callers(store: Store) -> None:
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
    ids = await asyncio.gather(*(store.add_event("acme", "custom") for _ in range(30)))
    assert len(set(ids)) == 30
    feed = [e.id for e in await store.list_events("acme", limit=10_000)]
    assert feed == sorted(feed) and set(ids) <= set(feed)


# -- terminal audits and events --------------------------------------------------------------


async def test_session_audits(store: Store) -> None:
    await connect(store, "acme", "d1")
    sid = await store.start_session_audit("acme", "d1", operator="ops", command="/bin/sh", now=10)
    await store.finish_session_audit(
        sid, bytes_in=5, bytes_out=50, reason="exit 0", now=12, exit_status=0, operator="alice"
    )
    with pytest.raises(NotFound):
        await store.finish_session_audit(sid, tenant="globex")
    with pytest.raises(NotFound):
        await store.finish_session_audit(sid + 1000)
    [audit] = await store.list_session_audits("acme")
    assert (audit.id, audit.ended_at, audit.bytes_out, audit.reason) == (sid, 12, 50, "exit 0")
    assert (audit.operator, audit.exit_status, audit.command) == ("alice", 0, "/bin/sh")
    assert await store.list_session_audits("globex") == []
    second = await store.start_session_audit("acme", "d1", operator="ops")
    assert [a.id for a in await store.list_session_audits("acme")] == [second, sid]
    assert [a.id for a in await store.list_session_audits("acme", limit=1)] == [second]
    closed = [e.payload for e in await store.list_events("acme") if e.kind == "terminal.closed"]
    assert closed == [
        {
            "session": sid,
            "reason": "exit 0",
            "exitStatus": 0,
            "bytesIn": 5,
            "bytesOut": 50,
            "seconds": 2.0,
        }
    ]


async def test_event_feed(store: Store) -> None:
    assert await store.latest_event_id("acme") == 0
    first = await store.add_event("acme", "a", "d1", {"n": 1}, now=5.0)
    other = await store.add_event("globex", "b")
    second = await store.add_event("acme", "c")
    assert first < other < second
    assert await store.latest_event_id("acme") == second
    [e1, e2] = await store.list_events("acme")
    assert (e1.id, e1.kind, e1.device_id, e1.payload, e1.ts) == (first, "a", "d1", {"n": 1}, 5.0)
    assert e2.payload == {} and e2.device_id is None
    assert [e.id for e in await store.list_events("acme", first)] == [second]
    assert [e.id for e in await store.list_events("acme", 0, limit=1)] == [first]


async def test_wait_events_wakes_on_commit(store: Store) -> None:
    first = await store.add_event("acme", "a")
    assert await store.wait_events("acme", first, timeout=0.01) == []

    async def later() -> None:
        await asyncio.sleep(0.05)
        await store.add_event("globex", "other-tenant")
        await store.add_event("acme", "b", payload={"n": 1})

    task = asyncio.create_task(later())
    loop = asyncio.get_running_loop()
    started = loop.time()
    got = await store.wait_events("acme", first, timeout=5)
    await task
    assert [(e.kind, e.payload) for e in got] == [("b", {"n": 1})]
    assert loop.time() - started < 0.9  # woken by the commit, not by a catch-up read
    assert [e.kind for e in await store.wait_events("acme", 0, timeout=5)] == ["a", "b"]


async def test_data_survives_reopen(make_store) -> None:
    async with make_store() as s:
        await connect(s, "acme", "d1")
        await s.ingest_telemetry("acme", "d1", [(1, "m", b"a")])
        events = await s.latest_event_id("acme")
    async with make_store() as s:
        assert (await s.get_device("acme", "d1")).connection_count == 1
        assert await s.telemetry_watermark("acme", "d1") == 1
        assert await s.add_event("acme", "later") > events  # ids are never reused


# -- retention -------------------------------------------------------------------------------


def policy(**kw) -> RetentionPolicy:
    values = {
        "telemetry_age": 7 * DAY,
        "telemetry_max_bytes": 1 << 30,
        "event_age": 90 * DAY,
        "audit_age": 365 * DAY,
    }
    values.update(kw)
    return RetentionPolicy(**values)


async def test_retention_by_age(store: Store) -> None:
    for tenant in ("acme", "globex"):
        await connect(store, tenant, "d1", now=NOW)
        old = [(s, "m", b"o" * 100) for s in range(1, 51)]
        new = [(s, "m", b"n" * 100) for s in range(51, 61)]
        await store.ingest_telemetry(tenant, "d1", old, now=NOW - 8 * DAY)
        await store.ingest_telemetry(tenant, "d1", new, now=NOW - 6 * DAY)
    await store.record_gap("acme", "d1", 61, 70, now=NOW - 8 * DAY)  # passed by the watermark
    for age in (100 * DAY, 91 * DAY, 89 * DAY, 1.0):
        await store.add_event("acme", "custom", payload={"age": age}, now=NOW - age)
    ended_old = await store.start_session_audit("acme", "d1", operator="o", now=NOW - 400 * DAY)
    await store.finish_session_audit(ended_old, now=NOW - 399 * DAY)
    ended_late = await store.start_session_audit("acme", "d1", operator="o", now=NOW - 400 * DAY)
    await store.finish_session_audit(ended_late, now=NOW - 300 * DAY)
    still_open = await store.start_session_audit("acme", "d1", operator="o", now=NOW - 500 * DAY)
    watermark = await store.telemetry_watermark("acme", "d1")

    report = await retention_pass(store, policy(), now=NOW)

    assert report.telemetry_records == 100 and report.telemetry_bytes == 100 * 100
    for tenant in ("acme", "globex"):
        kept = await all_telemetry(store, tenant, ["d1"])
        assert [r.seq for r in kept] == list(range(51, 61))
    assert await store.telemetry_usage() == {"acme": 1000, "globex": 1000}
    assert report.gaps == 1 and await store.telemetry_watermark("acme", "d1") == watermark
    ages = [e.payload.get("age") for e in await store.list_events("acme") if e.kind == "custom"]
    assert ages == [89 * DAY, 1.0]
    assert report.events == 2 + 5  # and the terminal events written 300 to 500 days back
    assert {a.id for a in await store.list_session_audits("acme")} == {ended_late, still_open}
    assert report.audits == 1
    again = await retention_pass(store, policy(), now=NOW)
    assert again.deleted == 0


async def test_retention_size_cap_per_tenant_deletes_the_oldest_only(store: Store) -> None:
    payload = b"x" * 10_000
    devices = ["d1", "d2", "d3"]
    for device in devices:
        await connect(store, "acme", device)
    await connect(store, "globex", "g1")
    for step in range(100):  # 300 records of 10 kB, interleaved across devices in time
        for k, device in enumerate(devices):
            await store.ingest_telemetry(
                "acme", device, [(step + 1, "m", payload)], now=NOW + step * 3 + k
            )
    await store.ingest_telemetry("globex", "g1", [(s, "m", payload) for s in range(1, 51)], now=NOW)
    cap = 1 << 20
    report = await retention_pass(store, policy(telemetry_max_bytes=cap, batch=64), now=NOW + 400)
    kept = await all_telemetry(store, "acme", devices)
    used = sum(len(r.payload) for r in kept)
    assert cap - 10_000 < used <= cap  # just under the cap: no more deleted than needed
    deleted = 300 - len(kept)
    assert report.over_cap == {"acme": (deleted, deleted * 10_000)}
    # the oldest went first: what is left is the newest, a contiguous tail in time
    assert [r.received_at for r in kept] == [NOW + 300 - len(kept) + i for i in range(len(kept))]
    assert len(await all_telemetry(store, "globex", ["g1"])) == 50
    assert await store.telemetry_usage() == {"acme": used, "globex": 50 * 10_000}


async def test_retention_usage_is_exact_with_retransmissions(store: Store) -> None:
    await connect(store, "acme", "d1")
    await store.ingest_telemetry("acme", "d1", [(s, "m", b"ab") for s in range(1, 11)])
    # a retransmission overlapping what is stored, with a duplicate inside the batch
    again = [(s, "m", b"abcd") for s in (8, 9, 10, 11, 11, 12)]
    assert await store.ingest_telemetry("acme", "d1", again) == 12
    assert await store.telemetry_usage() == {"acme": 10 * 2 + 2 * 4}
    assert await store.prune_telemetry_before(NOW * 10, limit=5) == (5, 10)
    assert await store.telemetry_usage() == {"acme": 5 * 2 + 2 * 4}
    assert await store.prune_telemetry("acme", NOW * 10) == 7
    assert await store.telemetry_usage() == {"acme": 0}
    assert await store.prune_telemetry_over("acme", 0, limit=10) == (0, 0)
