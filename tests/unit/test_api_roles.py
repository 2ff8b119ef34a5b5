"""The operator API's role matrix over every route, with real operator files: viewer,
deployer, terminal and admin operators, one removed and one expired, authenticated by the
controller's OperatorDirectory through httpx's ASGI transport."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from controller.api import auth
from controller.api.app import create_app
from controller.api.policy import required_role
from controller.registry import SessionRegistry
from controller.store.sqlite import SqliteStore
from margo_stream.identity.authority import Role, make_operator_cert
from margo_stream.identity.envelope import canonical
from margo_stream.identity.operator_files import OperatorDirectory, read_operator_key
from margo_stream.identity.pki import init_pki
from margo_stream.identity.tenant_files import issue_operator, parse_roles

pytestmark = pytest.mark.anyio

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
# what each route needs: the test's own statement of the policy, checked against policy.py
EXPECTED = {
    ("GET", "/api/v1/openapi.json"): Role.VIEWER,
    ("GET", "/api/v1/operators"): Role.VIEWER,
    ("GET", "/api/v1/me"): Role.VIEWER,
    ("GET", "/api/v1/deployments"): Role.VIEWER,
    ("POST", "/api/v1/deployments"): Role.DEPLOYER,
    ("DELETE", "/api/v1/devices/{device_id:path}/deployments/{deployment_id}"): Role.DEPLOYER,
    ("GET", "/api/v1/devices/{device_id:path}/telemetry"): Role.VIEWER,
    ("GET", "/api/v1/devices/{device_id:path}/terminal"): Role.TERMINAL,
    ("GET", "/api/v1/devices/{device_id:path}/logs/{deployment_id}"): Role.VIEWER,
    ("GET", "/api/v1/devices/{device_id:path}/logs/{deployment_id}/{component}"): Role.VIEWER,
    ("PATCH", "/api/v1/devices/{device_id:path}/labels"): Role.DEPLOYER,
    ("POST", "/api/v1/devices/{device_id:path}/revoke"): Role.ADMIN,
    ("POST", "/api/v1/devices/{device_id:path}/allow"): Role.ADMIN,
    ("POST", "/api/v1/admin/reload"): Role.ADMIN,
    ("GET", "/api/v1/devices"): Role.VIEWER,
    ("GET", "/api/v1/devices/{device_id:path}"): Role.VIEWER,
    ("GET", "/api/v1/events"): Role.VIEWER,
    ("GET", "/api/v1/events/stream"): Role.VIEWER,
    ("GET", "/api/v1/sessions"): Role.VIEWER,
    ("GET", "/api/v1/rollouts"): Role.VIEWER,
    ("GET", "/api/v1/rollouts/{name}"): Role.VIEWER,
    ("POST", "/api/v1/rollouts"): Role.DEPLOYER,
    ("POST", "/api/v1/rollouts/{name}/{command}"): Role.DEPLOYER,
}
OPERATORS = {"vera": ["viewer"], "dora": ["deployer"], "tess": ["terminal"], "gone": ["viewer"]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def token(pki: Path, name: str) -> str:
    path = (
        pki / "acme" / ("operator.token" if name == "admin" else f"operators/{name}/operator.token")
    )
    return path.read_text().strip()


def certify_expiring(pki: Path, name: str, expires: dt.datetime) -> None:
    """An operator whose certificate (signed by the root) expires at ``expires``."""
    issue_operator(pki, "acme", name, ["viewer", "deployer", "terminal"])
    odir = pki / "acme" / "operators" / name
    key = read_operator_key(odir / "operator.key")
    root = read_operator_key(pki / "acme" / "root.key")
    cert = make_operator_cert(
        "acme",
        name,
        parse_roles(["viewer", "deployer", "terminal"]),
        key.public_key(),
        issued=NOW - dt.timedelta(days=1),
        expires=expires,
        signers=[root],
    )
    (odir / "operator.cert.json").write_bytes(canonical(cert))


@pytest.fixture
def pki(tmp_path) -> Path:
    d = tmp_path / "certs"
    init_pki(d, ["acme", "globex"])
    for name, roles in OPERATORS.items():
        issue_operator(d, "acme", name, roles)
    certify_expiring(d, "olga", NOW + dt.timedelta(hours=1))  # expires while the API runs
    certify_expiring(d, "past", NOW - dt.timedelta(hours=1))  # expired before it started
    return d


def build(pki: Path, store: SqliteStore, monkeypatch):
    clock = [0.0]
    directory = OperatorDirectory(pki, clock=lambda: clock[0])
    tokens = {n: token(pki, n) for n in (*OPERATORS, "admin", "olga", "past")}
    shutil.rmtree(pki / "acme" / "operators" / "gone")  # removed after the controller started
    clock[0] += 2
    monkeypatch.setattr(auth, "_now", lambda: NOW + dt.timedelta(hours=2))  # olga has expired
    return create_app(store=store, registry=SessionRegistry(), operators=directory), tokens


@pytest.fixture
async def app(pki, tmp_path, monkeypatch):
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    yield build(pki, store, monkeypatch)
    await store.close()


@pytest.fixture
def sync_app(pki, tmp_path, monkeypatch):
    """For tests that never reach the store."""
    return build(pki, SqliteStore(tmp_path / "unused.db"), monkeypatch)


def concrete(template: str) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: {"device_id": "d1"}.get(m[1], "web"), template)


def app_routes(application) -> list[tuple[str, str]]:
    out = []
    for route in application.routes:
        if not route.path.startswith("/api/"):
            continue
        if isinstance(route, WebSocketRoute):
            out.append(("GET", route.path))
        elif isinstance(route, Route):
            out += [(m, route.path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return out


def test_the_policy_table_covers_every_route_as_the_test_expects(sync_app) -> None:
    application, _ = sync_app
    routes = app_routes(application)
    assert routes and ("GET", "/api/v1/operators") in routes
    for method, template in routes:
        assert (method, template) in EXPECTED, f"{method} {template} has no expected role"
        assert required_role(method, concrete(template)) == EXPECTED[(method, template)]
    assert required_role("GET", "/api/v1/nowhere") == Role.ADMIN  # unlisted: admin only
    assert required_role("HEAD", "/api/v1/devices") == Role.VIEWER


async def test_role_matrix_over_every_route(app) -> None:
    application, tokens = app
    roles = {
        "vera": {Role.VIEWER},
        "dora": {Role.DEPLOYER},
        "tess": {Role.TERMINAL},
        "admin": set(Role),
    }
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        for method, template in app_routes(application):
            path = concrete(template)
            needed = EXPECTED[(method, template)]
            params = {"after": "-1"} if path.endswith("/stream") else {}  # 400, not a stream
            for name, held in roles.items():
                resp = await client.request(
                    method,
                    path,
                    params=params,
                    headers={"Authorization": f"Bearer {tokens[name]}"},
                )
                what = f"{name} {method} {path}: {resp.status_code} {resp.text[:200]}"
                if needed in held or Role.ADMIN in held:
                    assert resp.status_code not in (401, 403), what
                else:
                    assert resp.status_code == 403, what
                    body = resp.json()
                    assert body["type"] == "urn:margo-stream:problem:forbidden", what
                    assert body["detail"] == f"operator {name!r} lacks the {needed.value!r} role"
            for name, why in (
                ("gone", "invalid bearer token"),
                ("past", "invalid bearer token"),
                ("olga", "operator 'olga''s certificate expired at "),
            ):
                resp = await client.request(
                    method, path, headers={"Authorization": f"Bearer {tokens[name]}"}
                )
                assert resp.status_code == 401 and why in resp.json()["detail"], (name, path)


async def test_operators_route_lists_the_tenant_without_tokens(app) -> None:
    application, tokens = app
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        resp = await client.get(
            "/api/v1/operators", headers={"Authorization": f"Bearer {tokens['vera']}"}
        )
    items = resp.json()["items"]
    assert [i["name"] for i in items] == ["admin", "dora", "olga", "tess", "vera"]
    assert items[0] == {"name": "admin", "roles": ["admin"], "expires": None}
    assert items[-1]["roles"] == ["viewer"] and items[-1]["expires"].endswith("Z")
    assert not any(t in resp.text for t in tokens.values())


def test_terminal_websocket_needs_the_terminal_role(sync_app) -> None:
    application, tokens = sync_app
    client = TestClient(application)
    path = "/api/v1/devices/d1/terminal"
    with pytest.raises(WebSocketDisconnect) as refused:
        with client.websocket_connect(path, headers={"Authorization": f"Bearer {tokens['vera']}"}):
            pass
    assert refused.value.code == 1008 and "lacks the 'terminal' role" in refused.value.reason
    with client.websocket_connect(
        path, headers={"Authorization": f"Bearer {tokens['tess']}"}
    ) as ws:
        ws.send_json({"type": "open", "command": None, "rows": 24, "cols": 80, "tty": True})
        message = ws.receive_json()  # past the policy: the route answers (no terminal service)
    assert message["type"] == "error"


def test_unused_key_material_is_not_needed(tmp_path) -> None:
    """The directory reads no private key: it works with every key file deleted."""
    d = tmp_path / "certs"
    init_pki(d, ["acme"])
    issue_operator(d, "acme", "vera", ["viewer"])
    for key in [*d.rglob("root.key*"), *d.rglob("operator.key")]:
        key.unlink()
    directory = OperatorDirectory(d)
    found = directory.authenticate(token(d, "vera"))
    assert found is not None and found.roles == {Role.VIEWER}
