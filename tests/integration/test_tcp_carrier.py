"""The channel over TCP (HTTP/2 over mutual TLS 1.3) against a real controller process with
``--tcp-listen``: real sockets on loopback, real certificates, a client built with
``connect_tcp`` speaking the protocol by hand, and hostile peers."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.transport.channel_connection import ConnectionLost, MessageStream
from margo_stream.transport.h2_carrier import TcpConnection
from margo_stream.transport.tcp_client import client_ssl_context, connect_tcp
from margo_stream.transport.tls_pipe import CRYPTO_ERROR
from tests.harness import Controller, Pki, signed_body, wait_for
from tests.integration.rawclient import craft, hello

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

DOC = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {applicationId: probe, id: probe-1}
  name: probe
  namespace: test
spec:
  deploymentProfile:
    type: process
    components:
      - name: probe
        properties:
          command: ["sleep", "600"]
"""


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def controller(pki, tmp_path):
    ctl = Controller(pki, tmp_path / "data", extra=["--tcp-listen", "127.0.0.1:0"])
    info = json.loads((tmp_path / "data" / "controller.json").read_text())
    ctl.tcp_port = int(info["tcp"].rsplit(":", 1)[1])  # type: ignore[attr-defined]
    yield ctl
    ctl.stop()


class Recorder:
    def __init__(self) -> None:
        self.opened: list[tuple[MessageStream, Any]] = []

    def stream_opened(self, stream: MessageStream, first: Any) -> None:
        self.opened.append((stream, first))

    def stream_failed(self, stream: Any, event: Any) -> None:
        pass

    def connection_lost(self, exc: ConnectionLost) -> None:
        pass


def device_context(pki: Any, device: str) -> ssl.SSLContext:
    ident = pki.device("acme", device)
    return client_ssl_context(ident / "cert.pem", ident / "key.pem", ident / "ca.pem")


async def dial(ctl: Controller, ctx: ssl.SSLContext) -> TcpConnection:
    port = ctl.tcp_port  # type: ignore[attr-defined]
    return await connect_tcp("127.0.0.1", port, ctx, server_name="acme", timeout=5)


async def say_hello(conn: TcpConnection, device: str) -> tuple[MessageStream, Any]:
    control = conn.open_stream()
    control.send(hello(device))
    with anyio.fail_after(5):
        return control, await control.receive()


async def test_hello_push_and_transport_over_tcp(pki, controller, tmp_path):
    token = pki.token("acme")
    conn = await dial(controller, device_context(pki, "press-01"))
    assert conn.carrier == "tcp" and conn.peer_certificate_der()
    recorder = Recorder()
    conn.handler = recorder
    control, ack = await say_hello(conn, "press-01")
    assert isinstance(ack, m.HelloAck) and ack.tenant == "acme"
    device = controller.wait_connected(token, "press-01")
    assert device["transport"] == "tcp"
    control.send(m.Ping(n=7))
    with anyio.fail_after(5):
        assert await control.receive() == m.Pong(n=7)
    # an operator's apply reaches the device as a push on a stream the controller opened
    body = signed_body(pki.token_file("acme"), [DOC], devices=["press-01"])
    r = httpx.post(
        f"{controller.api}/api/v1/deployments",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    with anyio.fail_after(10):
        while not recorder.opened:
            await anyio.sleep(0.01)
    push, first = recorder.opened[0]
    assert isinstance(first, m.Desired) and first.version == 1
    assert push.kind == "desired"
    conn.close(ErrorCode.NO_ERROR, "test done")
    device = controller.wait_connected(token, "press-01", connected=False, timeout=10)
    assert device["transport"] is None


async def test_controller_shutdown_closes_tcp_sessions(pki, controller):
    conn = await dial(controller, device_context(pki, "press-02"))
    await say_hello(conn, "press-02")
    controller.stop()
    with anyio.fail_after(10):
        lost = await conn.wait_closed()
    assert lost.code == ErrorCode.SHUTTING_DOWN and lost.by_peer


async def test_refusals(pki, controller, tmp_path):
    # another tenant's CA signing a certificate that claims acme: TLS (union of bundles)
    # passes, the admission refuses it before a request is read
    cert, key = craft(
        pki.dir, tmp_path / "forged", signer="globex", uris=["spiffe://acme/margo/client/x"]
    )
    ctx = client_ssl_context(cert, key, pki.dir / "acme" / "ca.pem")
    with pytest.raises(ConnectionLost) as info:
        conn = await dial(controller, ctx)
        await say_hello(conn, "x")
    assert info.value.code == ErrorCode.IDENTITY_REFUSED
    assert "'acme' trust bundle" in info.value.reason
    # no client certificate at all: TLS itself refuses (certificate_required)
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.minimum_version = ssl.TLSVersion.TLSv1_3
    bare.load_verify_locations(cafile=str(pki.dir / "acme" / "ca.pem"))
    bare.set_alpn_protocols(["h2"])
    with pytest.raises(ConnectionLost) as info:
        conn = await dial(controller, bare)
        await say_hello(conn, "x")
    assert info.value.code == CRYPTO_ERROR + 116, info.value
    # a certificate of no tenant's CA: TLS refuses it (unknown_ca)
    alien = alien_pki(tmp_path / "alien-pki")
    ctx = client_ssl_context(
        alien.dir / "acme" / "devices" / "y" / "cert.pem",
        alien.dir / "acme" / "devices" / "y" / "key.pem",
        pki.dir / "acme" / "ca.pem",
    )
    with pytest.raises(ConnectionLost) as info:
        conn = await dial(controller, ctx)
        await say_hello(conn, "y")
    assert info.value.code in (CRYPTO_ERROR + 48, CRYPTO_ERROR + 42), info.value
    wait_for(lambda: controller.log().count("TCP handshake with") >= 2, what="logged")
    assert "refused TCP connection from" in controller.log()
    assert controller.get(pki.token("acme"), "/devices").json()["items"] == []


def alien_pki(root: Path) -> Pki:
    """A second PKI, unrelated to the controller's, with a device "y" of its own "acme"."""
    pki = Pki(root, tenants=("acme",))
    pki.device("acme", "y")
    return pki


async def test_garbage_instead_of_tls_and_after_tls(pki, controller):
    port = controller.tcp_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(5000))
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass  # closed on us: what we wanted
    wait_for(lambda: "TCP handshake with" in controller.log(), what="the failure logged")
    # TLS completes with a real device certificate, then HTTP/2 garbage
    ctx = device_context(pki, "press-03")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="acme") as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64)
            tls.settimeout(5)
            got = b""
            try:
                while chunk := tls.recv(4096):
                    got += chunk
            except (ConnectionResetError, ssl.SSLError):
                pass
    assert got  # the server's SETTINGS, then its GOAWAY, before the close
    wait_for(lambda: "HTTP/2" in controller.log(), what="the protocol error logged")
    # the controller still serves a good device
    conn = await dial(controller, device_context(pki, "press-04"))
    _, ack = await say_hello(conn, "press-04")
    assert isinstance(ack, m.HelloAck)
    conn.close()
