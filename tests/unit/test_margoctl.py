"""margoctl against a real uvicorn server on loopback (started in a thread by the test) with a
real SQLite store and session registry."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.api.app import create_app
from controller.registry import SessionRegistry, SessionView
from controller.root_chains import RootChains
from controller.store.sqlite import SqliteStore
from margo_stream.cli import output
from margo_stream.cli.margoctl import main
from margo_stream.identity.authority import Role
from margo_stream.identity.operator_files import OperatorTable, Principal
from margo_stream.identity.pki import key_to_pem
from tests.authority_kit import Kit

TOKEN = "acme-operator-token"
ALICE_TOKEN = "alice-operator-token"
ALICE_EXPIRES = datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC)
OPERATORS = {
    TOKEN: Principal("acme", "admin", frozenset({Role.ADMIN}), None),
    "g": Principal("globex", "admin", frozenset({Role.ADMIN}), None),
    ALICE_TOKEN: Principal("acme", "alice", frozenset({Role.VIEWER, Role.TERMINAL}), ALICE_EXPIRES),
}
DOC = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {id: web, applicationId: web-app}
  name: web
  namespace: margo-poc
spec:
  deploymentProfile:
    type: process
    components:
      - name: main
        properties:
          command: [sleep, "3600"]
"""


@dataclass
class Server:
    url: str
    token_file: str
    store: SqliteStore
    registry: SessionRegistry
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)


@pytest.fixture
def server(tmp_path) -> Iterator[Server]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    token_file = tmp_path / "operator.token"
    token_file.write_text(TOKEN + "\n")
    # the operator's key and certificate beside the token (margoctl apply signs with them),
    # certified by a root whose metadata the API checks signatures against
    kit = Kit("acme", Ed25519PrivateKey.generate())
    (tmp_path / "operator.key").write_bytes(key_to_pem(kit.operator_key))
    (tmp_path / "operator.cert.json").write_bytes(kit.cert_bytes)
    (tmp_path / "certs" / "acme" / "root").mkdir(parents=True)
    (tmp_path / "certs" / "acme" / "root" / "1.json").write_bytes(kit.chain[0])
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        store = SqliteStore(tmp_path / "c.db")
        await store.open()
        registry = SessionRegistry()
        app = create_app(
            store=store,
            registry=registry,
            operators=OperatorTable(OPERATORS),
            roots=RootChains(tmp_path / "certs"),
        )
        uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        box.update(store=store, registry=registry, uv=uv, loop=asyncio.get_running_loop())
        ready.set()
        try:
            await uv.serve(sockets=[sock])
        finally:
            await store.close()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield Server(
        f"http://127.0.0.1:{port}", str(token_file), box["store"], box["registry"], box["loop"]
    )
    box["uv"].should_exit = True
    thread.join(10)
    sock.close()


def ctl(server: Server, *args: str) -> list[str]:
    return ["--api", server.url, "--token-file", server.token_file, *args]


def seed(server: Server) -> None:
    now = time.time()

    async def go() -> None:
        s = server.store
        for device_id in ("press-1", "press-2"):
            await s.device_connected(
                "acme",
                device_id,
                capabilities={"vendor": "Acme"},
                reported_labels={"fw": "1.2"},
                manifest_version=None,
                remote="r",
                now=now - 600,
            )
            await s.device_disconnected("acme", device_id, now - 300)
        await s.set_labels("acme", "press-1", {"line": "2", "site": "north"})  # an operator's
        await s.set_device_stats("acme", "press-1", {"bufferFill": 0.5, "dropped": 3})
        await s.device_connected(
            "globex",
            "other",
            capabilities={},
            reported_labels={},
            manifest_version=None,
            remote="r",
            now=now,
        )

    server.run(go())
    server.registry.register(SessionView("acme", "press-1", "192.0.2.1:999", now - 10, now - 2, 7))


def test_get_devices_table_json_yaml(server: Server, capsys) -> None:
    seed(server)
    assert main(ctl(server, "get", "devices")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "ID",
        "STATE",
        "CONNECTED",
        "LAST",
        "SEEN",
        "CONNECTIONS",
        "MANIFEST",
        "LABELS",
    ]
    # seeded straight into the store: no identity on the allow-list, so their state is unknown
    assert lines[1].split() == ["press-1", "unknown", "true", "2s", "1", "7", "line=2,site=north"]
    assert lines[2].split() == ["press-2", "unknown", "false", "5m", "1", "-", "<none>"]
    assert len(lines) == 3  # nothing of the other tenant

    assert main(ctl(server, "get", "devices", "-o", "json")) == 0
    items = json.loads(capsys.readouterr().out)
    assert isinstance(items, list) and [i["id"] for i in items] == ["press-1", "press-2"]
    assert items[0]["connected"] is True and items[0]["remote"] == "192.0.2.1:999"

    assert main(["get", "devices", "-o", "yaml", *ctl(server)]) == 0  # global flags anywhere
    assert [i["id"] for i in yaml.safe_load(capsys.readouterr().out)] == ["press-1", "press-2"]


def test_get_device_shows_stats(server: Server, capsys) -> None:
    seed(server)
    assert main(ctl(server, "get", "device", "press-1")) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[0] == "press-1"
    assert "Stats:\n  bufferFill: 0.5\n  dropped: 3" in out and "Remote: 192.0.2.1:999" in out
    assert main(ctl(server, "get", "device", "press-2", "-o", "json")) == 0
    assert json.loads(capsys.readouterr().out)["connected"] is False


def test_errors_are_one_line(server: Server, capsys, tmp_path) -> None:
    seed(server)
    assert main(ctl(server, "get", "device", "other")) == 1
    err = capsys.readouterr().err
    assert err == (
        f"margoctl: error: GET {server.url}/api/v1/devices/other: 404 Not Found: "
        "device 'other' not found\n"
    )
    missing = tmp_path / "nope.token"
    assert main(["--api", server.url, "--token-file", str(missing), "get", "devices"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("margoctl: error: cannot read token file ") and str(missing) in err
    bad = tmp_path / "bad.token"
    bad.write_text("wrong\n")
    assert main(["--api", server.url, "--token-file", str(bad), "get", "devices"]) == 1
    assert "401 Unauthorized: invalid bearer token" in capsys.readouterr().err

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    assert main(["--api", dead, "--token-file", server.token_file, "get", "devices"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"margoctl: error: cannot reach {dead}/api/v1/devices")
        and err.count("\n") == 1
    )


def test_environment_stands_in_for_flags(server: Server, capsys, monkeypatch) -> None:
    seed(server)
    monkeypatch.setenv("MARGO_API", server.url.removeprefix("http://"))
    monkeypatch.setenv("MARGO_TOKEN_FILE", server.token_file)
    assert main(["get", "devices", "-o", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    monkeypatch.delenv("MARGO_TOKEN_FILE")
    assert main(["get", "devices"]) == 1
    assert "MARGO_TOKEN_FILE" in capsys.readouterr().err


def test_apply_get_delete_deployments_and_watch(server: Server, capsys, tmp_path) -> None:
    seed(server)
    doc = tmp_path / "web.yaml"
    doc.write_text(DOC)
    assert main(ctl(server, "apply", "-f", str(doc), "--selector", "line=2")) == 0
    assert capsys.readouterr().out.startswith("deployment web (sha256:")
    assert main(ctl(server, "get", "deployments", "--device", "press-1", "-o", "json")) == 0
    [item] = json.loads(capsys.readouterr().out)
    assert (item["deploymentId"], item["device"], item["state"]) == ("web", "press-1", "pending")
    assert main(ctl(server, "get", "deployments")) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["press-1", "web", "pending"]

    assert main(ctl(server, "delete", "deployment", "web", "--device", "press-1")) == 0
    assert capsys.readouterr().out == "deployment web removed from device press-1\n"
    assert main(ctl(server, "delete", "deployment", "web", "--device", "press-1")) == 1
    assert "not assigned" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: [\n")
    assert main(ctl(server, "apply", "-f", str(bad), "--device", "press-1")) == 1
    assert capsys.readouterr().err.startswith(f"margoctl: error: {bad}")

    assert main(ctl(server, "watch", "--after", "0", "--count", "3", "-o", "json")) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["kind"] for e in events] == [
        "device.connected",
        "device.disconnected",
        "device.connected",
    ]
    assert main(ctl(server, "get", "events", "--after", str(events[-1]["id"]))) == 0
    assert "deployment.applied" in capsys.readouterr().out


def test_label_device_is_what_selectors_match(server: Server, capsys, tmp_path) -> None:
    seed(server)  # press-2 reports fw=1.2 of itself and has no operator labels
    doc = tmp_path / "web.yaml"
    doc.write_text(DOC)
    apply = ("apply", "-f", str(doc), "-o", "json")
    assert main(ctl(server, *apply, "--selector", "fw=1.2")) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == []  # a claim targets nothing

    assert main(ctl(server, "label", "device", "press-2", "fw=1.2", "line=7")) == 0
    assert capsys.readouterr().out == "device press-2 labels: fw=1.2,line=7\n"
    assert main(ctl(server, *apply, "--selector", "fw=1.2")) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == ["press-2"]
    assert main(ctl(server, *apply, "--selector", "reported.fw=1.2")) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == ["press-1", "press-2"]

    assert main(ctl(server, "label", "device", "press-2", "fw-", "-o", "json")) == 0
    assert json.loads(capsys.readouterr().out) == {"id": "press-2", "labels": {"line": "7"}}
    assert main(ctl(server, "get", "device", "press-2", "-o", "json")) == 0
    item = json.loads(capsys.readouterr().out)
    assert item["labels"] == {"line": "7"} and item["reported_labels"] == {"fw": "1.2"}
    assert main(ctl(server, "get", "device", "press-2")) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[-1] == "line=7" and "Reported labels: fw=1.2" in out

    assert main(ctl(server, "label", "device", "press-2", "bad key=1")) == 1
    err = capsys.readouterr().err
    assert err.startswith("margoctl: error: PATCH ") and "'bad key'" in err
    assert main(ctl(server, "label", "device", "press-2", "line")) == 1
    assert "expected KEY=VALUE or KEY-" in capsys.readouterr().err
    assert main(ctl(server, "label", "device", "other", "line=1")) == 1  # another tenant's
    assert "404" in capsys.readouterr().err


def test_get_telemetry_and_sessions(server: Server, capsys) -> None:
    seed(server)

    async def go() -> None:
        await server.store.ingest_telemetry(
            "acme", "press-1", [(1, "metrics", b'{"temp": 20.5}'), (2, "logs", b'{"msg": "hi"}')]
        )
        sid = await server.store.start_session_audit("acme", "press-1", operator="acme")
        await server.store.finish_session_audit(sid, bytes_in=1, bytes_out=2, reason="exit 0")

    server.run(go())
    assert (
        main(
            ctl(
                server,
                "get",
                "telemetry",
                "--device",
                "press-1",
                "--stream",
                "metrics",
                "-o",
                "json",
            )
        )
        == 0
    )
    [rec] = json.loads(capsys.readouterr().out)
    assert rec["seq"] == 1 and rec["temp"] == 20.5 and rec["stream"] == "metrics"
    assert main(ctl(server, "get", "telemetry", "--device", "press-1", "--since", "1h")) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(ctl(server, "get", "sessions", "-o", "json")) == 0
    [audit] = json.loads(capsys.readouterr().out)
    assert audit["reason"] == "exit 0" and audit["active"] is False
    assert main(ctl(server, "get", "telemetry", "--device", "other")) == 1
    assert "404" in capsys.readouterr().err


def test_output_helpers() -> None:
    assert output.age(None) == "<never>"
    assert output.age(100.0, now=105.0) == "5s"
    assert output.age(0.0, now=3 * 3600) == "3h"
    assert output.age("1970-01-01T00:00:00.000Z", now=3 * 86400) == "3d"
    assert output.render_table(["A", "LONG"], [["x", None], ["yy", True]]) == (
        "A    LONG\nx    -\nyy   true"
    )
    assert output.render("devices", [], "table") == "No devices found."


def test_get_operators(server: Server, capsys, tmp_path) -> None:
    assert main(ctl(server, "get", "operators")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ROLES", "EXPIRES"]
    assert lines[1].split()[:2] == ["admin", "admin"]
    assert lines[2].split() == ["alice", "terminal,viewer", "2031-01-01T00:00:00Z"]
    assert main(ctl(server, "get", "operators", "-o", "json")) == 0
    items = json.loads(capsys.readouterr().out)
    assert items[1] == {
        "name": "alice",
        "roles": ["terminal", "viewer"],
        "expires": "2031-01-01T00:00:00Z",
    }
    assert all("token" not in i for i in items)
    alice = tmp_path / "alice"
    alice.mkdir()
    (alice / "operator.token").write_text(ALICE_TOKEN + "\n")
    assert (
        main(
            [
                "--api",
                server.url,
                "--token-file",
                str(alice / "operator.token"),
                "get",
                "operators",
                "-o",
                "yaml",
            ]
        )
        == 0
    )
    assert [i["name"] for i in yaml.safe_load(capsys.readouterr().out)] == ["admin", "alice"]
    # alice is a viewer and a terminal user: she may not delete deployments
    args = ["--api", server.url, "--token-file", str(alice / "operator.token")]
    assert main([*args, "delete", "deployment", "web", "--device", "press-1"]) == 1
    assert "operator 'alice' lacks the 'deployer' role" in capsys.readouterr().err
