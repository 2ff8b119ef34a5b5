"""HTTP/2 push: one long-lived HTTP/2 connection per device, mutual TLS, desired state pushed.

The device opens ``GET /v1/stream`` and keeps the response open; the server writes one record
per new desired state on it. A record is a 4-byte big-endian length followed by a msgpack map::

    {"t": "desired", "v": <manifestVersion>, "m": <signed manifest bytes>,
     "s": <Ed25519 signature>, "b": {<digest>: <bytes>, ...}}

``b`` carries only the blobs the device lacks: the request names what it already holds
(``x-margo-stream-version`` and ``x-margo-stream-have: <digest>,<digest>``) and the server
remembers what it sent on this stream since. Status and capabilities go on separate streams to
the same Margo routes the pull API serves (``DeviceRouter``), so both transports accept
exactly the same documents. ``notify(tenant, device_ids)`` wakes the stream of each connected
device, which reads the newest manifest and pushes it if it is newer than what it sent.

Theory of operation: h2 is sans-IO. Per connection one reader task feeds bytes into
``H2Connection`` and dispatches its events; every write goes through ``H2Writer.flush`` under
one lock; ``send_data`` respects the peer's flow-control windows and waits on
``WindowUpdated``. The server sends an HTTP/2 PING every ``ping_interval`` seconds so NAT
bindings stay warm and a dead peer is noticed; that is the idle cost the bench measures.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import msgpack
from anyio.streams.tls import TLSAttribute, TLSStream

from controller.device_api.backend import DeviceBackend
from controller.device_api.http_messages import header_map
from controller.device_api.rest_poll import DeviceRouter, Response
from controller.device_api.tls import accept_tls, peer_identity, remote_address, server_context
from controller.ports import PeerCheck
from controller.problems import Problem
from controller.store.base import Store
from margo_stream.errors import PeerRejected, StoreError
from margo_stream.identity.spiffe import DeviceIdentity
from margo_stream.state.digest import is_digest

log = logging.getLogger("margo.device_api.h2")

_Family = Literal[socket.AddressFamily.AF_INET, socket.AddressFamily.AF_INET6]

STREAM_PATH = "/v1/stream"
PUSH_MEDIA_TYPE = "application/vnd.margo-stream.push.v1+msgpack"
MAX_REQUEST_BODY = 1 << 20
MAX_HAVE = 4096
_LEN = struct.Struct(">I")


def encode_record(record: dict[str, Any]) -> bytes:
    body = msgpack.packb(record, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class H2Writer:
    """Shared by server and client: flush h2's output and send data within flow control."""

    def __init__(self, conn: h2.connection.H2Connection, stream: Any) -> None:
        self.conn = conn
        self.stream = stream
        self.lock = anyio.Lock()
        self.window = anyio.Event()

    async def flush(self) -> None:
        async with self.lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send(data)

    def window_opened(self) -> None:
        self.window.set()
        self.window = anyio.Event()

    async def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        view = memoryview(data)
        while True:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0 and len(view):
                waiter = self.window
                await self.flush()
                await waiter.wait()
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(stream_id, bytes(chunk), end_stream=end_stream and not len(view))
            await self.flush()
            if not len(view):
                return

    async def respond(self, stream_id: int, response: Response) -> None:
        headers = [(":status", str(response.status)), *response.headers]
        if response.body:
            headers.append(("content-length", str(len(response.body))))
        self.conn.send_headers(stream_id, headers, end_stream=not response.body)
        await self.flush()
        if response.body:
            await self.send_data(stream_id, response.body, end_stream=True)


@dataclass
class _Request:
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)


@dataclass
class _Subscriber:
    tenant: str
    device_id: str
    wake: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    def poke(self) -> None:
        self.wake.set()


class H2PushServer:
    def __init__(
        self,
        store: Store,
        verifier: PeerCheck,
        certfile: str | Path,
        keyfile: str | Path,
        ca_bundle_paths: Sequence[str | Path],
        *,
        ping_interval: float = 30.0,
        touch_interval: float = 5.0,
    ) -> None:
        self.backend = DeviceBackend(store, touch_interval=touch_interval)
        self.router = DeviceRouter(self.backend)
        self.verifier = verifier
        self.ssl_context = server_context(certfile, keyfile, ca_bundle_paths, alpn=["h2"])
        self._identity_files = (certfile, keyfile)
        self.ping_interval = ping_interval
        self.subscribers: dict[tuple[str, str], _Subscriber] = {}
        self.port: int | None = None
        self.pushes = 0
        self.rejected = 0

    def trust_context(self, ca_bundle_paths: Sequence[str | Path]) -> ssl.SSLContext:
        """A TLS context like this server's with other tenant CA bundles (for a reload)."""
        certfile, keyfile = self._identity_files
        return server_context(certfile, keyfile, ca_bundle_paths, alpn=["h2"])

    def notify(self, tenant: str, device_ids: Sequence[str]) -> None:
        """Push the newest manifest to each of these devices that is connected, now."""
        for device_id in device_ids:
            sub = self.subscribers.get((tenant, device_id))
            if sub is not None:
                sub.poke()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[H2PushServer] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        family: _Family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = await anyio.create_tcp_listener(
            local_host=host, local_port=port, family=family, backlog=1024
        )
        async with listener, anyio.create_task_group() as tg:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            tg.start_soon(self.backend.touch_loop)
            task_status.started(self)
            await listener.serve(self._connection, task_group=tg)

    async def _connection(self, tcp: anyio.abc.SocketStream) -> None:
        remote = remote_address(tcp)
        try:
            tls = await accept_tls(tcp, self.ssl_context)
        except (OSError, TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            log.debug("TLS handshake from %s failed: %s", remote, exc)
            await tcp.aclose()
            return
        try:
            if tls.extra(TLSAttribute.alpn_protocol, None) != "h2":
                return
            try:
                identity: DeviceIdentity | None = peer_identity(tls, self.verifier)
                refusal = None
            except PeerRejected as exc:
                self.rejected += 1
                identity, refusal = None, exc.reason
                log.info("refused client %s: %s", remote, exc.reason)
            await _H2Session(self, tls, identity, refusal, remote).run()
        except (anyio.BrokenResourceError, anyio.EndOfStream, anyio.ClosedResourceError, OSError):
            pass
        except Exception:  # one connection's failure must never stop the server
            log.exception("connection from %s failed", remote)
        finally:
            with anyio.CancelScope(shield=True):
                await tls.aclose()


class _H2Session:
    def __init__(
        self,
        server: H2PushServer,
        tls: TLSStream,
        identity: DeviceIdentity | None,
        refusal: str | None,
        remote: str,
    ) -> None:
        self.server = server
        self.identity = identity
        self.refusal = refusal
        self.remote = remote
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.writer = H2Writer(self.conn, tls)
        self.tls = tls
        self.requests: dict[int, _Request] = {}
        self.push_scopes: dict[int, anyio.CancelScope] = {}

    async def run(self) -> None:
        self.conn.initiate_connection()
        await self.writer.flush()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pinger)
            try:
                while True:
                    try:
                        data = await self.tls.receive()
                    except anyio.EndOfStream:
                        break
                    try:
                        events = self.conn.receive_data(data)
                    except h2.exceptions.ProtocolError as exc:
                        log.info("HTTP/2 protocol error from %s: %s", self.remote, exc)
                        await self.writer.flush()
                        break
                    for event in events:
                        if isinstance(event, h2.events.ConnectionTerminated):
                            tg.cancel_scope.cancel()
                            return
                        self._dispatch(event, tg)
                    await self.writer.flush()
            finally:
                tg.cancel_scope.cancel()

    def _dispatch(self, event: Any, tg: anyio.abc.TaskGroup) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.requests[event.stream_id] = _Request(
                header_map(
                    [
                        (
                            k.encode() if isinstance(k, str) else k,
                            v.encode() if isinstance(v, str) else v,
                        )
                        for k, v in event.headers
                    ]
                )
            )
        elif isinstance(event, h2.events.DataReceived):
            req = self.requests.get(event.stream_id)
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if req is not None:
                req.body += event.data
                if len(req.body) > MAX_REQUEST_BODY:
                    self.requests.pop(event.stream_id, None)
                    self.conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        elif isinstance(event, h2.events.StreamEnded):
            req = self.requests.pop(event.stream_id, None)
            if req is not None:
                tg.start_soon(self._handle, event.stream_id, req)
        elif isinstance(event, h2.events.StreamReset):
            self.requests.pop(event.stream_id, None)
            scope = self.push_scopes.pop(event.stream_id, None)
            if scope is not None:
                scope.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.writer.window_opened()

    async def _pinger(self) -> None:
        counter = 0
        while True:
            await anyio.sleep(self.server.ping_interval)
            counter += 1
            self.conn.ping(counter.to_bytes(8, "big"))
            await self.writer.flush()

    def _readmit(self) -> bool:
        """Whether the identity is still admitted (not expired, not revoked); if not, it is
        forgotten and later requests are refused."""
        if self.identity is None:
            return False
        try:
            self.server.verifier.readmit(self.identity)
        except PeerRejected as exc:
            self.identity, self.refusal = None, exc.reason
            log.info("refused client %s: %s", self.remote, exc.reason)
            return False
        return True

    async def _handle(self, stream_id: int, req: _Request) -> None:
        method, path = req.headers.get(":method", ""), req.headers.get(":path", "")
        try:
            identity = self.identity if self._readmit() else None
            if identity is None:
                err = Problem(
                    403, f"client certificate refused: {self.refusal}", kind="not-authorized"
                )
                await self.writer.respond(stream_id, Response.problem(err, path))
            elif path.split("?")[0] == STREAM_PATH and method == "GET":
                await self._push_stream(stream_id, req)
            else:
                response = await self.server.router.handle(
                    identity, method, path, req.headers, bytes(req.body), self.remote
                )
                await self.writer.respond(stream_id, response)
        except (
            h2.exceptions.StreamClosedError,
            h2.exceptions.ProtocolError,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            OSError,
        ):
            pass
        except Exception:
            log.exception(
                "stream %d (%s %s) from %s failed", stream_id, method, path[:80], self.remote
            )
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)

    async def _push_stream(self, stream_id: int, req: _Request) -> None:
        assert self.identity is not None
        tenant, device_id = self.identity.tenant, self.identity.device_id
        backend = self.server.backend
        try:
            sent_version = int(req.headers.get("x-margo-stream-version", "0") or 0)
        except ValueError:
            sent_version = 0
        known = {
            d.strip()
            for d in req.headers.get("x-margo-stream-have", "").split(",")
            if is_digest(d.strip())
        }
        if len(known) > MAX_HAVE:
            known = set()
        self.conn.send_headers(
            stream_id,
            [(":status", "200"), ("content-type", PUSH_MEDIA_TYPE), ("cache-control", "no-store")],
        )
        await self.writer.flush()
        sub = _Subscriber(tenant, device_id)
        old = self.server.subscribers.get((tenant, device_id))
        if old is not None:
            old.scope.cancel()  # one push stream per device: the newest connection wins
        self.server.subscribers[(tenant, device_id)] = sub
        self.push_scopes[stream_id] = sub.scope
        await backend.connected(tenant, device_id, self.remote, sent_version or None)
        try:
            with sub.scope:
                while True:
                    sub.wake = anyio.Event()
                    if not self._readmit():  # revoked (the revocation woke us) or expired
                        self.conn.close_connection(h2.errors.ErrorCodes.REFUSED_STREAM)
                        await self.writer.flush()
                        await self.tls.aclose()
                        return
                    try:
                        desired = await backend.desired(tenant, device_id)
                    except (Problem, StoreError) as exc:
                        log.error("cannot read desired state of %s/%s: %s", tenant, device_id, exc)
                        desired = None
                    if desired is not None and desired.version > sent_version:
                        missing = desired.digests - known
                        blobs = await backend.blobs(tenant, missing)
                        record = encode_record(
                            {
                                "t": "desired",
                                "v": desired.version,
                                "m": desired.manifest_bytes,
                                "s": desired.signature,
                                "b": blobs,
                            }
                        )
                        await self.writer.send_data(stream_id, record)
                        self.server.pushes += 1
                        known = (known & desired.digests) | missing
                        sent_version = desired.version
                    await sub.wake.wait()
        finally:
            self.push_scopes.pop(stream_id, None)
            if self.server.subscribers.get((tenant, device_id)) is sub:
                del self.server.subscribers[(tenant, device_id)]
                with anyio.CancelScope(shield=True):
                    await backend.disconnected(tenant, device_id)
            if sub.scope.cancel_called:
                try:
                    self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                    with anyio.CancelScope(shield=True):
                        await self.writer.flush()
                except (
                    h2.exceptions.StreamClosedError,
                    h2.exceptions.ProtocolError,
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                    OSError,
                ):
                    pass


async def serve_h2_push(
    store: Store,
    verifier: PeerCheck,
    host: str,
    port: int,
    certfile: str | Path,
    keyfile: str | Path,
    ca_bundle_paths: Sequence[str | Path],
    *,
    ping_interval: float = 30.0,
    task_status: anyio.abc.TaskStatus[H2PushServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the HTTP/2 push server until cancelled; ``task_status.started(server)`` once
    listening. Call ``server.notify(tenant, device_ids)`` after a manifest was stored."""
    server = H2PushServer(
        store, verifier, certfile, keyfile, ca_bundle_paths, ping_interval=ping_interval
    )
    await server.serve(host, port, task_status=task_status)


__all__ = [
    "H2PushServer",
    "H2Writer",
    "PUSH_MEDIA_TYPE",
    "STREAM_PATH",
    "encode_record",
    "serve_h2_push",
]
