"""The operator API through httpx's ASGI transport, with a real SQLite store and registry."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence

import anyio
import httpx
import pytest

from controller.api.app import create_app
from controller.registry import SessionRegistry, SessionView
from controller.store.sqlite import SqliteStore
from margo_stream.identity.authority import Role
from margo_stream.identity.operator_files import OperatorTable, Principal

pytestmark = pytest.mark.anyio

ACME = "acme-token-0123456789"
GLOBEX = "globex-token-9876543210"
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


class Services:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    async def desired_changed(
        self, tenant: str, device_ids: list[str], *, blobs: Sequence[bytes] = ()
    ) -> None:
        self.calls.append((tenant, device_ids))


@pytest.fixture
async def env(tmp_path):
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    registry = SessionRegistry()
    services = Services()
    operators = OperatorTable.admins({ACME: "acme", GLOBEX: "globex"})
    app = create_app(store=store, registry=registry, operators=operators, desired=services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        client.headers["Authorization"] = f"Bearer {ACME}"
        yield client, store, registry, services
    await store.close()


async def add_device(
    store, tenant: str, device_id: str, *, labels=None, reported=None, now=1000.0
) -> None:
    """A device seen once; ``reported`` are its own labels, ``labels`` an operator's."""
    await store.device_connected(
        tenant,
        device_id,
        capabilities={"id": device_id, "vendor": "Acme"},
        reported_labels=reported or {},
        manifest_version=None,
        remote="10.0.0.1:4433",
        now=now,
    )
    await store.device_disconnected(tenant, device_id, now + 1)
    if labels:
        await store.set_labels(tenant, device_id, labels)


def is_problem(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert set(body) >= {"type", "title", "status", "detail"} and body["status"] == status
    return body


async def test_every_api_route_needs_a_valid_token(env) -> None:
    client, *_ = env
    for path in ("/api/v1/devices", "/api/v1/openapi.json", "/api/v1/events", "/api/v1/nowhere"):
        body = is_problem(await client.get(path, headers={"Authorization": ""}), 401)
        assert "missing bearer token" in body["detail"]
        body = is_problem(await client.get(path, headers={"Authorization": "Bearer nope"}), 401)
        assert body["detail"] == "invalid bearer token"
    resp = await client.get("/api/v1/devices", headers={"Authorization": "Basic " + ACME})
    assert is_problem(resp, 401)["detail"].startswith("missing")
    health = await client.get("/healthz", headers={"Authorization": ""})
    assert health.status_code == 200 and health.json() == {"status": "ok"}


async def test_devices_are_tenant_scoped_and_cross_tenant_looks_missing(env) -> None:
    client, store, registry, _ = env
    await add_device(store, "acme", "press-1", labels={"line": "2"})
    await add_device(store, "globex", "secret-device")
    resp = await client.get("/api/v1/devices")
    assert resp.status_code == 200
    [item] = resp.json()["items"]
    assert item["id"] == "press-1" and item["tenant"] == "acme" and item["connected"] is False
    assert item["labels"] == {"line": "2"} and item["capabilities"]["vendor"] == "Acme"
    assert item["last_seen"] == "1970-01-01T00:16:41.000Z" and item["connection_count"] == 1
    assert "remote" not in item

    other = await client.get("/api/v1/devices/secret-device")
    missing = await client.get("/api/v1/devices/no-such-devic")
    body_other, body_missing = is_problem(other, 404), is_problem(missing, 404)
    assert body_other["detail"].replace("secret-device", "X") == body_missing["detail"].replace(
        "no-such-devic", "X"
    )
    assert len(other.content) == len(missing.content)  # same length ids, same bytes
    assert other.content.replace(b"secret-device", b"no-such-devic") == missing.content

    globex = await client.get("/api/v1/devices", headers={"Authorization": f"Bearer {GLOBEX}"})
    assert [d["id"] for d in globex.json()["items"]] == ["secret-device"]


async def test_connected_flag_and_last_seen_come_from_the_registry(env) -> None:
    client, store, registry, _ = env
    await add_device(store, "acme", "press-1")
    now = time.time()
    registry.register(SessionView("acme", "press-1", "192.0.2.7:5555", now - 5, now, 42))
    item = (await client.get("/api/v1/devices/press-1")).json()
    assert item["connected"] is True and item["remote"] == "192.0.2.7:5555"
    assert item["manifest_version"] == 42
    assert item["last_seen"].startswith(time.strftime("%Y-%m-%d", time.gmtime(now)))
    # a session of another tenant with the same id changes nothing here
    registry.register(SessionView("globex", "ghost", "x", now, now))
    assert [d["id"] for d in (await client.get("/api/v1/devices")).json()["items"]] == ["press-1"]


async def test_unknown_route_and_method_are_problems(env) -> None:
    client, *_ = env
    assert is_problem(await client.get("/api/v1/nowhere"), 404)["detail"].startswith("no route")
    is_problem(await client.put("/api/v1/events"), 405)


async def test_openapi_document_matches_the_routes(env) -> None:
    client, *_ = env
    doc = (await client.get("/api/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    app = client._transport.app  # type: ignore[attr-defined]
    routed: dict[str, set[str]] = {}
    for route in app.routes:
        path = re.sub(r"\{device_id(:path)?\}", "{deviceId}", route.path)
        path = path.replace("{deployment_id}", "{deploymentId}")
        routed.setdefault(path, set()).update(m.lower() for m in route.methods - {"HEAD"})
    described = {p: set(ops) for p, ops in doc["paths"].items()}
    assert routed == described


async def test_apply_list_and_delete_deployments(env) -> None:
    client, store, _, services = env
    await add_device(store, "acme", "d1", labels={"site": "north"})
    await add_device(store, "acme", "d2", labels={"site": "south"})
    await add_device(store, "globex", "g1", labels={"site": "north"})
    text = DOC.format(id="web") + "---\n" + DOC.format(id="db")
    resp = await client.post(
        "/api/v1/deployments", json={"documents": [text], "selector": {"site": "north"}}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["devices"] == ["d1"] and body["notified"] is True
    assert [d["deploymentId"] for d in body["deployments"]] == ["web", "db"]
    assert services.calls == [("acme", ["d1"])]
    web = body["deployments"][0]
    assert (await store.get_blob("acme", web["digest"])).decode() == DOC.format(id="web")

    items = (await client.get("/api/v1/deployments", params={"device": "d1"})).json()["items"]
    assert [(i["deploymentId"], i["state"], i["assigned"]) for i in items] == [
        ("db", "pending", True),
        ("web", "pending", True),
    ]
    # a device reports only on what a manifest issued to it (controller/store/claims.py)
    issued = json.dumps({"deployments": [{"deploymentId": "web"}]}).encode()
    await store.put_manifest("acme", "d1", 3, issued, b"sig")
    await store.put_status(
        "acme",
        "d1",
        {
            "deploymentId": "web",
            "adoptedManifestVersion": 3,
            "status": {"state": "failed", "error": {"code": "E1", "source": "x", "message": "m"}},
            "components": [{"name": "main", "state": "failed"}],
        },
        seq=1,
    )
    [web_item] = [
        i
        for i in (await client.get("/api/v1/deployments")).json()["items"]
        if i["deploymentId"] == "web"
    ]
    assert web_item["state"] == "failed" and web_item["manifestVersion"] == 3
    assert web_item["error"]["code"] == "E1" and web_item["components"][0]["name"] == "main"

    resp = await client.delete("/api/v1/devices/d1/deployments/web")
    assert resp.status_code == 204
    assert services.calls[-1] == ("acme", ["d1"])
    is_problem(await client.delete("/api/v1/devices/d1/deployments/web"), 404)
    is_problem(await client.delete("/api/v1/devices/g1/deployments/web"), 404)
    is_problem(await client.get("/api/v1/deployments", params={"device": "g1"}), 404)

    bad = await client.post(
        "/api/v1/deployments", json={"documents": ["kind: [1"], "devices": ["d1"]}
    )
    assert "invalid YAML" in is_problem(bad, 422)["detail"]
    unknown = await client.post(
        "/api/v1/deployments", json={"documents": [DOC.format(id="x")], "devices": ["g1"]}
    )
    is_problem(unknown, 404)
    is_problem(await client.post("/api/v1/deployments", json={"documents": []}), 400)
    is_problem(await client.post("/api/v1/deployments", content=b"{"), 400)
    assert not any(d.deployment_id == "x" for d in await store.list_deployments("acme"))


async def test_telemetry_route(env) -> None:
    client, store, *_ = env
    await add_device(store, "acme", "d1")
    await add_device(store, "globex", "g1")
    await store.ingest_telemetry(
        "acme",
        "d1",
        [
            (1, "metrics", json.dumps({"ts": 1.5, "temp": 21.5, "stream": "metrics"}).encode()),
            (2, "logs", b'"plain string"'),
            (3, "metrics", b"\xff\xfe"),
        ],
        now=2000.0,
    )
    items = (await client.get("/api/v1/devices/d1/telemetry")).json()["items"]
    assert items[0] == {
        "seq": 1,
        "stream": "metrics",
        "received_at": "1970-01-01T00:33:20.000Z",
        "ts": 1.5,
        "temp": 21.5,
    }
    assert items[1]["value"] == "plain string" and "payload_b64" in items[2]
    only = await client.get("/api/v1/devices/d1/telemetry", params={"stream": "logs"})
    assert [i["seq"] for i in only.json()["items"]] == [2]
    later = await client.get(
        "/api/v1/devices/d1/telemetry", params={"since": "1970-01-01T01:00:00Z"}
    )
    assert later.json()["items"] == []
    paged = await client.get("/api/v1/devices/d1/telemetry", params={"after": 1, "limit": 1})
    assert [i["seq"] for i in paged.json()["items"]] == [2]
    is_problem(await client.get("/api/v1/devices/d1/telemetry", params={"since": "soon"}), 400)
    is_problem(await client.get("/api/v1/devices/d1/telemetry", params={"limit": 0}), 400)
    is_problem(await client.get("/api/v1/devices/g1/telemetry"), 404)


async def test_events_pages_and_stream(env) -> None:
    client, store, *_ = env
    await add_device(store, "acme", "d1")
    await store.add_event("globex", "hidden")
    page = (await client.get("/api/v1/events")).json()
    assert [e["kind"] for e in page["items"]] == ["device.connected", "device.disconnected"]
    assert page["next"] == page["items"][-1]["id"]
    empty = (await client.get("/api/v1/events", params={"after": page["next"]})).json()
    assert empty == {"items": [], "next": page["next"]}

    resp = await client.get("/api/v1/events/stream", params={"limit": 2, "after": 0})
    assert resp.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in resp.text.split("\n\n") if f.startswith("id:")]
    assert [f.splitlines()[1] for f in frames] == [
        "event: device.connected",
        "event: device.disconnected",
    ]
    first_id = page["items"][0]["id"]
    resumed = await client.get(
        "/api/v1/events/stream", params={"limit": 1}, headers={"Last-Event-ID": str(first_id)}
    )
    assert "event: device.disconnected" in resumed.text

    async def soon() -> None:
        with anyio.fail_after(5):  # until the stream waits for new events
            while not store._waiters:
                await anyio.sleep(0.001)
        await store.add_event("acme", "live.one")

    async with anyio.create_task_group() as tg:
        tg.start_soon(soon)
        live = await client.get("/api/v1/events/stream", params={"limit": 1})
    assert "event: live.one" in live.text and "device.connected" not in live.text


async def test_sessions_route(env) -> None:
    client, store, *_ = env
    await add_device(store, "acme", "d1")
    sid = await store.start_session_audit("acme", "d1", operator="acme", command="sh", now=10.0)
    await store.start_session_audit("acme", "d1", operator="acme", now=20.0)
    await store.finish_session_audit(sid, bytes_in=3, bytes_out=4, reason="closed", now=12.0)
    items = (await client.get("/api/v1/sessions")).json()["items"]
    assert [i["active"] for i in items] == [True, False]
    assert items[1]["bytes_out"] == 4 and items[1]["ended_at"] == "1970-01-01T00:00:12.000Z"
    globex = await client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {GLOBEX}"})
    assert globex.json()["items"] == []


def test_token_matching() -> None:
    table = OperatorTable.admins({"tok-a": "acme", "tok-g": "globex"})
    assert table.authenticate("tok-g") == Principal(
        "globex", "admin", frozenset({Role.ADMIN}), None
    )
    assert table.authenticate("tok-") is None and table.authenticate("") is None
    assert [p.name for p in table.operators("acme")] == ["admin"]


async def test_single_document_is_stored_byte_for_byte_and_push_failure_is_reported(env) -> None:
    client, store, _, services = env
    await add_device(store, "acme", "d1")
    text = "# a comment the digest must cover\n" + DOC.format(id="solo")

    async def broken(tenant: str, device_ids: list[str]) -> None:
        raise RuntimeError("push machinery down")

    services.desired_changed = broken
    resp = await client.post("/api/v1/deployments", json={"documents": [text], "devices": ["d1"]})
    assert resp.status_code == 200 and resp.json()["notified"] is False
    [dep] = resp.json()["deployments"]
    assert await store.get_blob("acme", dep["digest"]) == text.encode()
    [assigned] = await store.list_assignments("acme", "d1")
    assert assigned.digest == dep["digest"]


async def test_websocket_without_token_is_refused(env) -> None:
    client, *_ = env
    app = client._transport.app  # type: ignore[attr-defined]
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(
        {"type": "websocket", "path": "/api/v1/devices/d1/terminal", "headers": []}, receive, send
    )
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "unauthorized"}]
