"""Real processes for integration tests: a PKI in a temporary directory, a controller and
agents started through their console scripts, and polling helpers with timeouts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from aioquic.quic.configuration import QuicConfiguration

from margo_stream.identity.pki import init_pki, issue_device
from margo_stream.transport.quic_client import client_configuration
from margo_stream.transport.quic_server import server_configuration

BIN = Path(sys.executable).parent


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 15.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}"
        + (f" (last error: {last_exc})" if last_exc else "")
    )


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def traversable_to(state: Path) -> Path:
    """Let other users pass through (execute only, 0711) every directory on the way to
    ``state`` that they cannot pass yet, and create ``state``.

    An agent run as root starts process workloads as ``nobody``, which must reach its working
    directory under ``STATE/work/``. pytest's ``tmp_path`` and its parents are 0700 root
    directories: without this only the agent could enter them. Nothing here becomes readable
    or listable; the agent itself makes STATE and what is in it as open as a workload needs.
    (pytest puts its own root, /tmp/pytest-of-<user>, back to 0700 at its next session.)
    """
    state.mkdir(parents=True, exist_ok=True)
    for d in reversed(state.resolve().parents):
        st = d.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o011 != 0o011:
            d.chmod((st.st_mode & 0o7777) | 0o011)
    return state


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pki:
    def __init__(self, root: Path, tenants: tuple[str, ...] = ("acme", "globex")) -> None:
        self.dir = root / "certs"
        init_pki(self.dir, list(tenants), ["localhost", "127.0.0.1"])

    def device(self, tenant: str, device_id: str) -> Path:
        return issue_device(self.dir, tenant, device_id)

    def quic_configurations(self, **kw: Any) -> tuple[QuicConfiguration, QuicConfiguration]:
        """The production client (device acme/press-01) and controller QUIC configurations;
        ``kw`` (``max_datagram_size``...) given to both."""
        ident = self.device("acme", "press-01")
        client = client_configuration(
            str(ident / "cert.pem"),
            str(ident / "key.pem"),
            str(self.dir / "controller/ca.pem"),
            server_name="localhost",
            **kw,
        )
        server = server_configuration(
            str(self.dir / "controller/cert.pem"), str(self.dir / "controller/key.pem"), **kw
        )
        return client, server

    def token(self, tenant: str) -> str:
        return (self.dir / tenant / "operator.token").read_text().strip()

    def token_file(self, tenant: str) -> Path:
        return self.dir / tenant / "operator.token"


class Proc:
    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Controller(Proc):
    def __init__(
        self,
        pki: Pki,
        data: Path,
        *,
        quic_port: int = 0,
        api_port: int = 0,
        extra: list[str] | None = None,
    ) -> None:
        self.data = data
        ready = data / "controller.json"
        ready.unlink(missing_ok=True)
        data.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [
                str(BIN / "margo-controller"),
                "--certs",
                str(pki.dir),
                "--data",
                str(data),
                "--listen",
                f"127.0.0.1:{quic_port}",
                "--api",
                f"127.0.0.1:{api_port}",
                "--log-format",
                "text",
                *(extra or []),
            ],
            data / "controller.log",
        )
        info = wait_for(
            lambda: self.alive() and ready.exists() and json.loads(ready.read_text()),
            what=f"controller ready file\n{self.log_tail()}",
        )
        self.quic = info["quic"]
        self.quic_port = int(self.quic.rsplit(":", 1)[1])
        self.api = info["api"]

    def log_tail(self) -> str:
        try:
            return self.log()[-3000:]
        except OSError:
            return ""

    def get(self, token: str, path: str, **params: Any) -> httpx.Response:
        return httpx.get(
            f"{self.api}/api/v1{path}",
            params=params,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )

    def device(self, token: str, device_id: str) -> dict[str, Any] | None:
        r = self.get(token, f"/devices/{device_id}")
        return r.json() if r.status_code == 200 else None

    def wait_connected(
        self,
        token: str,
        device_id: str,
        connected: bool = True,
        timeout: float = 20.0,
        min_connections: int = 0,
    ) -> dict[str, Any]:
        def check() -> Any:
            d = self.device(token, device_id)
            return (
                d
                if d and d["connected"] is connected and d["connection_count"] >= min_connections
                else None
            )

        return wait_for(
            check, timeout, what=f"{device_id} connected={connected}\n{self.log_tail()}"
        )


class Agent(Proc):
    def __init__(
        self,
        identity: Path,
        controller: str,
        state: Path,
        *,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state = state
        state.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [
                str(BIN / "margo-agent"),
                "--identity",
                str(identity),
                "--controller",
                controller,
                "--state",
                str(state),
                "--log-format",
                "text",
                "--backoff-base",
                "0.1",
                "--backoff-cap",
                "1.0",
                *(extra or []),
            ],
            state.parent / f"{state.name}.log",
            env=env,
        )

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.state / "agent-status.json").read_text())
        except (OSError, ValueError):
            return {}


def signed_body(token_file: Path, documents: list[str], **fields: object) -> dict[str, object]:
    """An apply request body as margoctl sends it: the documents signed with the key beside
    the operator token."""
    from margo_stream.cli.signing import sign_documents
    from margo_stream.identity.operator_files import load_operator_credentials

    creds = load_operator_credentials(operator_dir=None, token_file=token_file)
    return {
        "documents": documents,
        "signatures": sign_documents(documents, creds),
        "certificate": creds.certificate,
        **fields,
    }
