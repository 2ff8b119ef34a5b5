"""Labels a device cannot forge: operator labels apart from device-reported ones, in the real
SQLite store, the operator API (httpx ASGI transport) and the Margo capabilities path."""

from __future__ import annotations

import json
import sqlite3

import httpx
import pytest

from controller.api.app import create_app
from controller.device_api.backend import DeviceBackend
from controller.labels import (
    MAX_LABELS,
    LabelError,
    apply_changes,
    check_label,
    selector_matches,
)
from controller.registry import SessionRegistry
from controller.store.sqlite import SqliteStore
from controller.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION, migrate
from margo_stream.errors import NotFound
from margo_stream.identity.authority import Role
from margo_stream.identity.operator_files import OperatorTable, Principal

pytestmark = pytest.mark.anyio

ACME = "acme-token-0123456789"
VIEWER = "acme-viewer-token-42"
DOC = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {{id: {id}, applicationId: demo-app}}
  name: {id}
  namespace: margo-poc
spec:
  deploymentProfile:
    type: process
    components:
      - name: main
        properties:
          command: [sleep, "3600"]
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "c.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def client(store):
    operators = OperatorTable(
        {
            ACME: Principal("acme", "admin", frozenset({Role.ADMIN}), None),
            "globex-t": Principal("globex", "admin", frozenset({Role.ADMIN}), None),
            VIEWER: Principal("acme", "vic", frozenset({Role.VIEWER}), None),
        }
    )
    app = create_app(store=store, registry=SessionRegistry(), operators=operators)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
        c.headers["Authorization"] = f"Bearer {ACME}"
        yield c


async def hello(store: SqliteStore, device_id: str, reported: dict[str, str] | None, tenant="acme"):
    """What the control session stores for a device's hello (controller.session)."""
    return await store.device_connected(
        tenant,
        device_id,
        capabilities={"labels": reported or {}},
        reported_labels=reported,
        manifest_version=None,
        remote="10.0.0.1:4433",
    )


async def apply(client: httpx.AsyncClient, selector: dict[str, str], dep: str = "web") -> list:
    resp = await client.post(
        "/api/v1/deployments", json={"documents": [DOC.format(id=dep)], "selector": selector}
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["devices"]


async def label(client: httpx.AsyncClient, device_id: str, changes: dict) -> httpx.Response:
    return await client.patch(f"/api/v1/devices/{device_id}/labels", json={"labels": changes})


# -- the rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("", "1"),
        ("line", ""),
        ("line", None),
        ("line", 1),
        ("-line", "1"),
        ("line.", "1"),
        ("li ne", "1"),
        ("line", "a b"),
        ("line", "x/y"),
        ("lïne", "1"),
        ("k" * 129, "1"),
        ("line", "v" * 64),
        ("reported.line", "1"),
    ],
)
def test_bad_operator_labels_are_refused_by_name(key, value) -> None:
    with pytest.raises(LabelError) as exc:
        check_label(key, value)
    assert exc.value.key == str(key)
    assert isinstance(exc.value, ValueError)


def test_good_labels_and_changes() -> None:
    for key, value in (("line", "1"), ("example.com/zone", "north_2"), ("a", "B-1.x")):
        check_label(key, value)
    assert apply_changes({"a": "1", "b": "2"}, {"a": None, "c": "3", "gone": None}) == {
        "b": "2",
        "c": "3",
    }
    many = {f"k{i}": "v" for i in range(MAX_LABELS)}
    with pytest.raises(LabelError, match=f"at most {MAX_LABELS}"):
        apply_changes(many, {"one-more": "v"})


def test_selectors_read_operator_labels_unless_asked_for_reported() -> None:
    operator, reported = {"site": "north"}, {"line": "1", "site": "south"}
    assert not selector_matches({"line": "1"}, operator, reported)
    assert selector_matches({"reported.line": "1"}, operator, reported)
    assert selector_matches({"site": "north", "reported.site": "south"}, operator, reported)
    assert not selector_matches({"reported.site": "north"}, operator, reported)


# -- the store ---------------------------------------------------------------------------------


async def test_a_hello_writes_reported_labels_only(store: SqliteStore) -> None:
    rec = await hello(store, "press-1", {"line": "1"})
    assert rec.labels == {} and rec.reported_labels == {"line": "1"}
    assert await store.update_labels("acme", "press-1", {"site": "north"}) == {"site": "north"}
    rec = await hello(store, "press-1", {"site": "south"})  # a later claim changes nothing
    assert rec.labels == {"site": "north"} and rec.reported_labels == {"site": "south"}
    rec = await hello(store, "press-1", None)  # None keeps what the device reported before
    assert rec.reported_labels == {"site": "south"}
    with pytest.raises(LabelError):
        await store.update_labels("acme", "press-1", {"bad key": "x"})
    with pytest.raises(LabelError):
        await store.set_labels("acme", "press-1", {"reported.site": "x"})
    assert (await store.get_device("acme", "press-1")).labels == {"site": "north"}
    with pytest.raises(NotFound):
        await store.update_labels("globex", "press-1", {"site": "x"})


async def test_the_migration_moves_old_labels_to_reported(tmp_path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, str(path), MIGRATIONS[:3])  # the schema before the two label sets
    conn.execute(
        "INSERT INTO devices (tenant, device_id, labels, first_seen)"
        " VALUES ('acme', 'press-1', ?, 1.0)",
        (json.dumps({"line": "1", "site": "north"}),),
    )
    conn.close()
    for _ in range(2):  # opening again migrates nothing more
        s = SqliteStore(path)
        await s.open()
        try:
            rec = await s.get_device("acme", "press-1")
        finally:
            await s.close()
        assert rec.labels == {} and rec.reported_labels == {"line": "1", "site": "north"}
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


# -- the operator API --------------------------------------------------------------------------


async def test_only_operator_labels_give_a_selector_its_power(store, client) -> None:
    await hello(store, "press-1", {"line": "1"})
    await hello(store, "press-2", {})
    assert await apply(client, {"line": "1"}) == []  # the device's claim captures nothing

    resp = await label(client, "press-1", {"line": "1"})
    assert resp.status_code == 200, resp.text
    item = resp.json()
    assert item["labels"] == {"line": "1"} and item["reported_labels"] == {"line": "1"}
    assert await apply(client, {"line": "1"}, "db") == ["press-1"]
    assert await apply(client, {"reported.line": "1"}, "mq") == ["press-1"]

    await hello(store, "press-2", {"line": "1"})  # another device claims the same
    assert await apply(client, {"line": "1"}, "db") == ["press-1"]
    assert await apply(client, {"reported.line": "1"}, "mq") == ["press-1", "press-2"]

    item = (await client.get("/api/v1/devices/press-2")).json()
    assert item["labels"] == {} and item["reported_labels"] == {"line": "1"}


async def test_label_removal_and_merge(store, client) -> None:
    await hello(store, "press-1", {})
    await label(client, "press-1", {"line": "1", "site": "north"})
    resp = await label(client, "press-1", {"line": None, "zone": "a"})
    assert resp.status_code == 200 and resp.json()["labels"] == {"site": "north", "zone": "a"}
    events = (await client.get("/api/v1/events")).json()["items"]
    assert events[-1]["kind"] == "device.labels"
    assert events[-1]["payload"] == {"labels": {"site": "north", "zone": "a"}}
    assert await apply(client, {"line": "1"}) == []


async def test_bad_labels_are_refused_with_a_problem_naming_them(store, client) -> None:
    await hello(store, "press-1", {})
    await label(client, "press-1", {"site": "north"})
    for changes, named in (
        ({"ok": "1", "bad key": "1"}, "bad key"),
        ({"line": ""}, "line"),
        ({"line": 7}, "line"),
        ({"line": "x" * 64}, "line"),
        ({"reported.line": "1"}, "reported.line"),
    ):
        resp = await label(client, "press-1", changes)
        assert resp.status_code == 400, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        body = resp.json()
        assert body["type"].endswith(":invalid-label") and repr(named) in body["detail"]
        assert body["errors"][0]["field"] == f"labels.{named}"
    for body in ({"labels": {}}, {"labels": ["line=1"]}, {}):
        resp = await client.patch("/api/v1/devices/press-1/labels", json=body)
        assert resp.status_code == 400 and resp.json()["type"].endswith(":invalid-body")
    # nothing of a refused request was stored
    assert (await store.get_device("acme", "press-1")).labels == {"site": "north"}


async def test_labels_of_unknown_or_other_tenants_devices_are_not_found(store, client) -> None:
    await hello(store, "secret", {}, tenant="globex")
    for device_id in ("secret", "nowhere"):
        resp = await label(client, device_id, {"line": "1"})
        assert resp.status_code == 404
    assert (await store.get_device("globex", "secret")).labels == {}


async def test_a_viewer_may_not_label(store, client) -> None:
    await hello(store, "press-1", {})
    resp = await client.patch(
        "/api/v1/devices/press-1/labels",
        json={"labels": {"line": "1"}},
        headers={"Authorization": f"Bearer {VIEWER}"},
    )
    assert resp.status_code == 403 and "deployer" in resp.json()["detail"]
    assert (await store.get_device("acme", "press-1")).labels == {}


# -- the Margo REST capabilities path ----------------------------------------------------------


async def test_margo_capabilities_cannot_set_operator_labels(store, client) -> None:
    backend = DeviceBackend(store)
    doc = {
        "properties": {
            "id": "gw/1",
            "vendor": "Acme",
            "modelNumber": "m",
            "serialNumber": "s",
        },
        "labels": {"line": "1", "site": "north"},
    }
    assert await backend.put_capabilities("acme", "gw/1", "gw/1", doc, "10.0.0.2:1") is True
    rec = await store.get_device("acme", "gw/1")
    assert rec.labels == {} and rec.reported_labels == {"line": "1", "site": "north"}
    assert await apply(client, {"line": "1"}) == []

    assert (await label(client, "gw/1", {"line": "2"})).status_code == 200
    doc["labels"] = {"line": "1"}
    assert await backend.put_capabilities("acme", "gw/1", "gw/1", doc, "10.0.0.2:1") is False
    await backend.connected("acme", "gw/1", "10.0.0.2:1", None)  # a push session keeps them
    rec = await store.get_device("acme", "gw/1")
    assert rec.labels == {"line": "2"} and rec.reported_labels == {"line": "1"}
    assert await apply(client, {"line": "1"}) == []
    assert await apply(client, {"line": "2"}) == ["gw/1"]
