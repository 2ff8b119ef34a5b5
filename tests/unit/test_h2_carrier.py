"""The TCP carrier's HTTP/2 mapping, both ends in one process: two ``TcpConnection`` objects
wired by an in-memory transport (real TLS 1.3 with real certificates, real h2 state machines,
no sockets). The hostile cases drive the controller's end with a raw h2 client."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

import h2.connection
import h2.events
import pytest

from controller.device_api.tls import server_context, tenant_bundle_paths
from margo_stream.errors import PeerRejected
from margo_stream.identity.trust import load_server_credentials
from margo_stream.protocol import messages as m
from margo_stream.protocol.channel import StreamFailed
from margo_stream.protocol.codes import ErrorCode, Sender
from margo_stream.transport import h2_mapping as hm
from margo_stream.transport.channel_connection import (
    ConnectionLost,
    MessageStream,
    StreamClosed,
)
from margo_stream.transport.h2_carrier import TcpConnection
from margo_stream.transport.tcp_client import client_ssl_context

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class MemoryTransport(asyncio.Transport):
    """One end of an in-memory byte pipe: writes reach the peer's protocol next loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        super().__init__()
        self.loop = loop
        self.name = name
        self.peer: MemoryTransport | None = None
        self.protocol: asyncio.Protocol | None = None
        self.closing = False
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.peer is None:
            return
        self.written += len(data)
        self.loop.call_soon(self.peer._deliver, bytes(data))

    def _deliver(self, data: bytes) -> None:
        if not self.closing and self.protocol is not None:
            self.protocol.data_received(data)

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        peer = self.peer
        self.loop.call_soon(self._lost)
        if peer is not None and not peer.closing:
            self.loop.call_soon(peer.close)

    def _lost(self) -> None:
        if self.protocol is not None:
            self.protocol.connection_lost(None)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (
            ("127.0.0.1", 40000 if self.name == "agent" else 443) if name == "peername" else default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def wire(a: asyncio.Protocol, b: asyncio.Protocol) -> tuple[MemoryTransport, MemoryTransport]:
    loop = asyncio.get_running_loop()
    ta, tb = MemoryTransport(loop, "agent"), MemoryTransport(loop, "controller")
    ta.peer, tb.peer = tb, ta
    ta.protocol, tb.protocol = a, b
    b.connection_made(tb)
    a.connection_made(ta)
    return ta, tb


def contexts(pki: Any, device: str = "press-01") -> tuple[ssl.SSLContext, ssl.SSLContext]:
    creds = load_server_credentials(pki.dir)
    server = server_context(
        creds.cert_path, creds.key_path, tenant_bundle_paths(pki.dir), alpn=[hm.ALPN_H2]
    )
    ident = pki.device("acme", device)
    client = client_ssl_context(ident / "cert.pem", ident / "key.pem", ident / "ca.pem")
    return server, client


class Handler:
    """A session stand-in: records what the peer opens and sends."""

    def __init__(self, on_open: Callable[[MessageStream, Any], None] | None = None) -> None:
        self.opened: list[MessageStream] = []
        self.failed: list[StreamFailed] = []
        self.lost: ConnectionLost | None = None
        self.on_open = on_open

    def stream_opened(self, stream: MessageStream, first: Any) -> None:
        self.opened.append(stream)
        if self.on_open is not None:
            self.on_open(stream, first)

    def stream_failed(self, stream: MessageStream | None, event: StreamFailed) -> None:
        self.failed.append(event)

    def connection_lost(self, exc: ConnectionLost) -> None:
        self.lost = exc


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (value := predicate()):
            await asyncio.sleep(0.001)
    return value


def hello(device_id: str = "press-01") -> m.Hello:
    return m.Hello(
        device_id=device_id, agent_version="t", capabilities=m.Capabilities(id=device_id)
    )


async def pair(pki: Any, **server_kw: Any) -> tuple[TcpConnection, TcpConnection, Handler]:
    server_ctx, client_ctx = contexts(pki)
    loop = asyncio.get_running_loop()
    ctl = TcpConnection(Sender.CONTROLLER, loop, server_ctx, **server_kw)
    agent = TcpConnection(Sender.AGENT, loop, client_ctx, server_name="acme")
    handler = Handler()

    def established(conn: TcpConnection) -> None:
        conn.handler = handler

    ctl.on_established = established
    wire(agent, ctl)
    await asyncio.wait_for(agent.wait_handshake(), 5)
    await until(lambda: ctl.handshake_done and ctl.parked == hm.REVERSE_POOL)
    return agent, ctl, handler


async def test_agent_streams_both_ways_and_state_goes(pki):
    agent, ctl, handler = await pair(pki)
    assert agent.carrier == ctl.carrier == "tcp"
    # the controller sees the device's certificate, the agent the controller's
    assert ctl.peer_certificate_der() and agent.peer_certificate_der()
    control = agent.open_stream()
    control.send(hello())
    (remote,) = await until(lambda: handler.opened)
    assert remote.kind == "control"
    assert await remote.receive() == hello()
    remote.send(m.HelloAck(tenant="acme", device_id="press-01", server_time=1, keepalive_s=20))
    ack = await asyncio.wait_for(control.receive(), 5)
    assert isinstance(ack, m.HelloAck)
    for n in range(50):
        control.send(m.Ping(n=n))
    for n in range(50):
        assert await asyncio.wait_for(remote.receive(), 5) == m.Ping(n=n)
    control.end()
    assert await asyncio.wait_for(remote.receive(), 5) is None
    remote.end()
    assert await asyncio.wait_for(control.receive(), 5) is None
    # both directions over: neither side keeps the stream
    await until(lambda: agent.lanes == 0 and ctl.lanes == 0)
    assert not agent.streams and not ctl.streams and len(ctl.core) == 0
    agent.close(ErrorCode.NO_ERROR, "bye")
    lost = await asyncio.wait_for(ctl.wait_closed(), 5)
    assert lost.by_peer and lost.reason == "bye"


async def test_controller_streams_ride_parked_requests_and_the_pool_refills(pki):
    agent, ctl, _ = await pair(pki)
    agent_handler = Handler()
    agent.handler = agent_handler
    # more pushes than parked requests: the rest wait, none blocks, all arrive in order
    pushes = [ctl.open_stream() for _ in range(10)]
    assert len({p.stream_id for p in pushes}) == 10 and all(p.stream_id % 2 == 0 for p in pushes)
    for i, push in enumerate(pushes):
        push.send(m.Desired(version=i + 1, manifest=b"x" * 1000, signature=b"s"))
        push.send(m.Blob(digest="sha256:" + "a" * 64, data=bytes(70_000)))  # past one window
        push.end()
    await until(lambda: len(agent_handler.opened) == 10)
    got = []
    for stream in agent_handler.opened:
        first = await stream.receive()
        blob = await stream.receive()
        assert isinstance(blob, m.Blob) and len(blob.data) == 70_000
        assert await stream.receive() is None
        got.append(first.version)
        stream.send(m.DesiredResult(version=first.version, ok=True), end=True)
    assert sorted(got) == list(range(1, 11))
    for push in pushes:
        result = await asyncio.wait_for(push.receive(), 5)
        assert isinstance(result, m.DesiredResult) and result.ok
    await until(lambda: agent.lanes == 0 and ctl.lanes == 0)
    assert ctl.parked == hm.REVERSE_POOL  # refilled


async def test_resets_carry_our_codes(pki):
    agent, ctl, handler = await pair(pki)
    telemetry = agent.open_stream()
    telemetry.send(m.Telemetry(oldest=1, first=1, last=1, count=1, codec="none", data=b"\x90"))
    (remote,) = await until(lambda: handler.opened)
    remote.reset(ErrorCode.CANCELLED)
    with pytest.raises(StreamClosed) as info:
        await asyncio.wait_for(telemetry.receive(), 5)
    assert info.value.code == ErrorCode.CANCELLED
    await until(lambda: agent.lanes == 0 and ctl.lanes == 0)


async def test_close_is_goaway_with_code_and_reason(pki):
    agent, ctl, _ = await pair(pki)
    ctl.close(ErrorCode.SHUTTING_DOWN, "controller shutting down")
    lost = await asyncio.wait_for(agent.wait_closed(), 5)
    assert lost.code == ErrorCode.SHUTTING_DOWN and lost.reason == "controller shutting down"
    assert lost.by_peer


async def test_keepalive_ping_is_answered(pki):
    agent, ctl, _ = await pair(pki)
    before = agent.last_received
    await asyncio.sleep(0.01)
    agent.ping()
    await until(lambda: agent.last_received > before)


async def test_an_agent_that_parks_nothing_loses_the_connection(pki, monkeypatch):
    monkeypatch.setattr(hm, "BIND_TIMEOUT", 0.2)
    server_ctx, client_ctx = contexts(pki)
    loop = asyncio.get_running_loop()
    ctl = TcpConnection(Sender.CONTROLLER, loop, server_ctx)
    ctl.on_established = lambda c: setattr(c, "handler", Handler())
    agent = TcpConnection(Sender.AGENT, loop, client_ctx, server_name="acme", reverse_pool=0)
    wire(agent, ctl)
    await asyncio.wait_for(agent.wait_handshake(), 5)
    push = ctl.open_stream()  # does not block
    push.send(m.Desired(version=1, manifest=b"m", signature=b"s"))
    lost = await asyncio.wait_for(ctl.wait_closed(), 5)
    assert lost.code == ErrorCode.PROTOCOL_ERROR and "no reverse request" in lost.reason


async def test_identity_refused_is_goaway_before_any_request(pki):
    server_ctx, client_ctx = contexts(pki)
    loop = asyncio.get_running_loop()
    ctl = TcpConnection(Sender.CONTROLLER, loop, server_ctx)

    def refuse(conn: TcpConnection) -> None:
        assert conn.peer_certificate_der()
        conn.close(ErrorCode.IDENTITY_REFUSED, PeerRejected("not on the allow-list").reason)

    ctl.on_established = refuse
    agent = TcpConnection(Sender.AGENT, loop, client_ctx, server_name="acme")
    wire(agent, ctl)
    with pytest.raises(ConnectionLost) as info:
        await asyncio.wait_for(agent.wait_handshake(), 5)
    assert info.value.code == ErrorCode.IDENTITY_REFUSED
    assert info.value.reason == "not on the allow-list"


# --- a raw h2 client against the controller's end -------------------------------------------------


class RawClient(asyncio.Protocol):
    """TLS + a bare h2 client we drive by hand (through the carrier's TLS pipe)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        from margo_stream.transport.tls_pipe import TlsPipe

        self.tls = TlsPipe(ctx, server_side=False, server_hostname="acme")
        self.h2 = h2.connection.H2Connection(hm.h2_configuration(client_side=True))
        self.events: list[h2.events.Event] = []
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.tls.handshake()
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.tls.feed(data)
        if not self.tls.established:
            if self.tls.handshake():
                self.h2.initiate_connection()
        if self.tls.established:
            plain = self.tls.read()
            if plain:
                self.events.extend(self.h2.receive_data(plain))
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def flush(self, raw: bytes = b"") -> None:
        if self.tls.established:
            self.tls.write(self.h2.data_to_send() + raw)
        out = self.tls.output()
        if out and self.transport is not None:
            self.transport.write(out)

    def request(self, headers: list[tuple[str, str]], *, end: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    def of(self, kind: type, sid: int | None = None) -> list[Any]:
        return [
            e for e in self.events if isinstance(e, kind) and (sid is None or e.stream_id == sid)
        ]

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        found = self.of(h2.events.ConnectionTerminated)
        return found[0] if found else None


async def raw_pair(pki: Any) -> tuple[RawClient, TcpConnection, Handler]:
    server_ctx, client_ctx = contexts(pki)
    loop = asyncio.get_running_loop()
    ctl = TcpConnection(Sender.CONTROLLER, loop, server_ctx)
    handler = Handler()
    ctl.on_established = lambda c: setattr(c, "handler", handler)
    raw = RawClient(client_ctx)
    wire(raw, ctl)
    await until(lambda: raw.of(h2.events.RemoteSettingsChanged))
    return raw, ctl, handler


def good(path: str = hm.REVERSE_PATH) -> list[tuple[str, str]]:
    headers = hm.request_headers(hm.RequestKind.CHANNEL, "acme")
    return [(k, path if k == ":path" else v) for k, v in headers]


async def test_unknown_path_method_and_version_are_refused_with_a_reason(pki):
    raw, ctl, handler = await raw_pair(pki)
    cases = {
        404: good("/admin"),
        405: [(k, "GET" if k == ":method" else v) for k, v in good(hm.CHANNEL_PATH)],
        400: [(k, v) for k, v in good(hm.CHANNEL_PATH) if k != hm.VERSION_HEADER],
        415: [(k, "text/plain" if k == "content-type" else v) for k, v in good(hm.CHANNEL_PATH)],
    }
    for status, headers in cases.items():
        sid = raw.request(headers)
        (answer,) = await until(lambda sid=sid: raw.of(h2.events.ResponseReceived, sid))
        got = dict(answer.headers)
        assert got[b":status"] == str(status).encode()
        assert got[hm.ERROR_HEADER.encode()], status
    assert ctl.refused == 4 and ctl.closed is None and not handler.opened


async def test_too_many_parked_requests_are_refused(pki):
    raw, ctl, _ = await raw_pair(pki)
    sids = [raw.request(good(), end=False) for _ in range(hm.MAX_PARKED + 3)]
    resets = await until(
        lambda: len(raw.of(h2.events.StreamReset)) == 3 and raw.of(h2.events.StreamReset)
    )
    assert {r.stream_id for r in resets} == set(sids[hm.MAX_PARKED :])
    assert all(r.error_code == hm.REFUSED_STREAM for r in resets)
    assert ctl.parked == hm.MAX_PARKED and ctl.closed is None


async def test_endless_refusals_close_the_connection(pki):
    raw, ctl, _ = await raw_pair(pki)
    for _ in range(hm.MAX_REFUSED + 1):
        raw.request(good("/nothing-here"))
        await asyncio.sleep(0)
    lost = await asyncio.wait_for(ctl.wait_closed(), 5)
    assert lost.code == ErrorCode.PROTOCOL_ERROR and "refused" in lost.reason


async def test_oversized_headers_close_the_connection(pki):
    raw, ctl, _ = await raw_pair(pki)
    await until(lambda: raw.of(h2.events.SettingsAcknowledged) or True)
    await asyncio.sleep(0.05)  # our SETTINGS (header list 8 KiB) acknowledged
    raw.request([*good(hm.CHANNEL_PATH), ("x-big", "a" * (70 << 10))])
    lost = await asyncio.wait_for(ctl.wait_closed(), 5)
    assert not lost.by_peer and lost.code == ErrorCode.PROTOCOL_ERROR
    assert "header" in lost.reason.lower()
    await until(lambda: raw.goaway())


async def test_garbage_after_tls_closes_with_a_clear_reason(pki):
    raw, ctl, _ = await raw_pair(pki)
    raw.flush(b"\x00\x00\x04\x99\x00\x00\x00\x00\x00garbage garbage" * 100)
    lost = await asyncio.wait_for(ctl.wait_closed(), 5)
    assert lost.code == ErrorCode.PROTOCOL_ERROR and lost.reason.startswith("HTTP/2:")
    assert "over the 16384-byte limit" in lost.reason  # refused at the header, not buffered


async def test_a_response_that_is_not_the_channel_fails_the_stream(pki):
    """A proxy or load balancer answering for the controller: the stream fails with why."""
    server_ctx, client_ctx = contexts(pki)
    loop = asyncio.get_running_loop()
    agent = TcpConnection(Sender.AGENT, loop, client_ctx, server_name="acme", reverse_pool=0)
    handler = Handler()
    agent.handler = handler

    class FakeServer(asyncio.Protocol):
        def __init__(self) -> None:
            from margo_stream.transport.tls_pipe import TlsPipe

            self.tls = TlsPipe(server_ctx, server_side=True)
            self.h2 = h2.connection.H2Connection(hm.h2_configuration(client_side=False))

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.tls.feed(data)
            if not self.tls.established and self.tls.handshake():
                self.h2.initiate_connection()
            if self.tls.established:
                for event in self.h2.receive_data(self.tls.read()):
                    if isinstance(event, h2.events.RequestReceived):
                        self.h2.send_headers(event.stream_id, [(":status", "502")], end_stream=True)
                self.tls.write(self.h2.data_to_send())
            self.transport.write(self.tls.output())  # type: ignore[attr-defined]

    wire(agent, FakeServer())
    await asyncio.wait_for(agent.wait_handshake(), 5)
    control = agent.open_stream()
    control.send(hello())
    with pytest.raises(StreamClosed) as info:
        await asyncio.wait_for(control.receive(), 5)
    assert "answered 502" in info.value.reason
    assert handler.failed and handler.failed[0].kind == "control"


async def test_flow_control_reopens_as_the_core_consumes(pki):
    """Far more than one window on one stream and on the connection: data waits for
    WINDOW_UPDATE, and the receiver reopens its windows as the core takes the bytes."""
    agent, ctl, handler = await pair(pki)
    telemetry = agent.open_stream(limit=1000)
    batch = bytes(200_000)
    for n in range(40):  # 8 MB: 8 stream windows, 2 connection windows
        telemetry.send(
            m.Telemetry(oldest=1, first=n + 1, last=n + 1, count=1, codec="none", data=batch)
        )
    (remote,) = await until(lambda: handler.opened)
    for n in range(40):
        got = await asyncio.wait_for(remote.receive(), 5)
        assert got.first == n + 1 and len(got.data) == len(batch)
    assert ctl.core.buffered == 0


def test_frame_guard_refuses_at_the_header():
    guard = hm.FrameGuard(preface=True)
    assert guard.check(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") is None
    ok = (100).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + bytes(100)
    for i in range(len(ok)):  # split anywhere
        assert guard.check(ok[i : i + 1]) is None
    assert "16777215 bytes" in (guard.check(b"\xff\xff\xff" + bytes(6)) or "")
