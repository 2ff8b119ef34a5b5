"""A bug in a stream handler ends that one connection, never the shared endpoint.

Real QUIC on loopback, real certificates: one server endpoint holds two devices; a handler
that raises while serving one of them closes that connection with INTERNAL_ERROR, the other
device's connection keeps answering, and the endpoint accepts new connections.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import pytest

from margo_stream.identity.trust import load_device_credentials
from margo_stream.identity.verify import PeerVerifier
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.transport.connection import Connection, ConnectionLost, MessageStream
from margo_stream.transport.quic_client import client_configuration, connect
from margo_stream.transport.quic_server import server_configuration, start_server

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

BOOM = 666


class BuggyHandler:
    """Answers every ping with a pong, except ping 666, on which it has a bug."""

    def stream_opened(self, stream: MessageStream, first: Any) -> None:
        def on_message(message: Any) -> None:
            if isinstance(message, m.Hello):
                stream.send(m.HelloAck(tenant="acme", device_id="x", server_time=0, keepalive_s=20))
            elif isinstance(message, m.Ping):
                if message.n == BOOM:
                    raise KeyError("a bug in a feature handler")
                stream.send(m.Pong(n=message.n))

        stream.on_message = on_message

    def stream_failed(self, stream: Any, event: Any) -> None:
        pass

    def connection_lost(self, exc: ConnectionLost) -> None:
        pass


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _client(pki: Any, device: str, port: int) -> tuple[Connection, asyncio.BaseTransport]:
    creds = load_device_credentials(pki.device("acme", device))
    qconf = client_configuration(
        str(creds.cert_path), str(creds.key_path), str(creds.ca_path), server_name="acme"
    )
    conn, transport = await connect("127.0.0.1", port, qconf)
    with anyio.fail_after(10):
        await conn.wait_handshake()
    return conn, transport


def _hello() -> m.Hello:
    return m.Hello(device_id="x", agent_version="0", capabilities=m.Capabilities(id="x"))


async def _control(conn: Connection) -> MessageStream:
    stream = conn.open_stream()
    stream.send(_hello())
    with anyio.fail_after(5):
        assert isinstance(await stream.receive(), m.HelloAck)
    return stream


async def _ping(conn: Connection, n: int) -> Any:
    stream = await _control(conn)
    stream.send(m.Ping(n=n))
    with anyio.fail_after(5):
        return await stream.receive()


async def test_a_failing_handler_closes_only_its_own_connection(pki, caplog) -> None:
    wfm = pki.dir / "acme" / "controller"  # acme's fleet-manager identity
    verifier = PeerVerifier.from_dir(pki.dir)
    accepted: list[Connection] = []

    def accept(conn: Connection, identity: Any) -> None:
        conn.handler = BuggyHandler()
        accepted.append(conn)

    transport, server = await start_server(
        "127.0.0.1",
        0,
        server_configuration(str(wfm / "cert.pem"), str(wfm / "key.pem")),
        verifier.verify,
        accept,
    )
    port = transport.get_extra_info("sockname")[1]
    clients: list[tuple[Connection, asyncio.BaseTransport]] = []
    try:
        good, t1 = await _client(pki, "good-01", port)
        bad, t2 = await _client(pki, "bad-01", port)
        clients += [(good, t1), (bad, t2)]
        assert isinstance(await _ping(good, 1), m.Pong)

        with caplog.at_level(logging.ERROR, logger="margo.transport"):
            stream = await _control(bad)
            stream.send(m.Ping(n=BOOM))
            with anyio.fail_after(5):
                lost = await bad.wait_closed()
        assert lost.by_peer and lost.code == ErrorCode.INTERNAL_ERROR
        assert any("KeyError" in (r.exc_text or "") for r in caplog.records), caplog.text

        # the other device is untouched, and the endpoint still takes new connections
        assert good.closed is None
        assert isinstance(await _ping(good, 2), m.Pong)
        again, t3 = await _client(pki, "late-01", port)
        clients.append((again, t3))
        assert isinstance(await _ping(again, 3), m.Pong)
        assert len(accepted) == 3
    finally:
        for conn, t in clients:
            conn.close()
            conn.cancel_timer()
            t.close()
        server.close_all(ErrorCode.SHUTTING_DOWN, "test over")
        for conn in accepted:
            conn.cancel_timer()
        transport.close()
