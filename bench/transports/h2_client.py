"""HTTP/2 push, device side: one TLS connection (ALPN ``h2``, client certificate), one
long-lived ``GET /v1/stream`` on which desired states arrive as length-prefixed msgpack
records (see ``controller.device_api.h2_push``), and status/capabilities on short streams.

``connect()`` enters a task group holding the reader task; ``close()`` leaves it, so both must
be called from the same task (or use ``async with``).
"""

from __future__ import annotations

import contextlib
import json
import ssl
import struct
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import msgpack
from anyio.streams.tls import TLSAttribute

from bench.transports.base import (
    DesiredUpdate,
    StatusState,
    TransportCounters,
    capabilities_document,
    open_tls,
    status_document,
)
from controller.device_api.h2_push import STREAM_PATH, H2Writer
from controller.device_api.tls import client_context
from margo_stream.identity.trust import load_device_credentials

_LEN = struct.Struct(">I")
MAX_RECORD = 64 << 20


class H2Error(Exception):
    pass


def _text(value: str | bytes) -> str:
    """A header name or value as text: h2 hands out str with ``header_encoding`` set (as here),
    though its annotations say bytes."""
    return value.decode() if isinstance(value, bytes) else value


class _Pending:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.done = anyio.Event()
        self.reset: int | None = None


class H2PushClient:
    name = "h2-push"

    def __init__(
        self, identity_dir: Path, host: str, port: int, *, report_capabilities: bool = True
    ) -> None:
        self.creds = load_device_credentials(identity_dir)
        self.tenant, self.device_id = self.creds.tenant, self.creds.device_id
        self.host, self.port = host, port
        self.report_capabilities = report_capabilities
        self.counters = TransportCounters()
        self._ctx = client_context(
            self.creds.cert_path, self.creds.key_path, self.creds.ca_path, alpn=["h2"]
        )
        self._tls: Any = None
        self._conn: h2.connection.H2Connection | None = None
        self._writer: H2Writer | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._pending: dict[int, _Pending] = {}
        self._push_stream: int | None = None
        self._buf = bytearray()
        self._send, self._recv = anyio.create_memory_object_stream[DesiredUpdate | BaseException](
            16
        )
        self._version = 0
        self.blobs: dict[str, bytes] = {}
        self.closed = anyio.Event()
        self.push_refusal: tuple[int, bytes] | None = None  # status and body if refused

    async def __aenter__(self) -> H2PushClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        # the tenant as the server name: the controller presents its identity for this tenant
        self._tls = await open_tls(
            self.host, self.port, self._ctx, self.counters, server_hostname=self.tenant
        )
        if self._tls.extra(TLSAttribute.alpn_protocol, None) != "h2":
            await self._tls.aclose()
            raise H2Error("server did not negotiate h2")
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self._conn = h2.connection.H2Connection(config=config)
        self._conn.initiate_connection()
        self._writer = H2Writer(self._conn, self._tls)
        await self._writer.flush()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._reader)
        if self.report_capabilities:
            status, body = await self.request(
                "PUT",
                f"/api/v1/capabilities/{self.device_id}",
                json.dumps(capabilities_document(self.device_id)).encode(),
            )
            if status not in (200, 201):
                raise H2Error(f"capabilities refused: {status} {body[:200]!r}")
        await self._open_stream()

    async def _open_stream(self) -> None:
        assert self._conn is not None and self._writer is not None
        sid = self._conn.get_next_available_stream_id()
        self._push_stream = sid
        self._pending[sid] = _Pending()
        headers = [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", self.host),
            (":path", STREAM_PATH),
            ("x-margo-stream-version", str(self._version)),
            ("x-margo-stream-have", ",".join(sorted(self.blobs))),
        ]
        self._conn.send_headers(sid, headers, end_stream=True)
        self.counters.requests += 1
        await self._writer.flush()

    async def close(self) -> None:
        if self._tg is None:
            self._send.close()
            self._recv.close()
            return
        tg, self._tg = self._tg, None
        tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            try:
                if self._conn is not None and self._writer is not None:
                    self._conn.close_connection()
                    await self._writer.flush()
            except (
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.EndOfStream,
                OSError,
                h2.exceptions.ProtocolError,
            ):
                pass
            # the server may be gone without a word (kill -9): closing must not fail then
            with contextlib.suppress(
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.EndOfStream,
                OSError,
                ssl.SSLError,
            ):
                await self._tls.aclose()
        try:
            await tg.__aexit__(None, None, None)
        except BaseExceptionGroup as group:
            rest = group.split(
                (
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                    OSError,
                    ssl.SSLError,
                    anyio.EndOfStream,
                )
            )[1]
            if rest is not None:
                raise rest from None
        finally:
            self._send.close()
            self._recv.close()

    async def _reader(self) -> None:
        assert self._conn is not None and self._writer is not None
        try:
            while True:
                try:
                    data = await self._tls.receive()
                except anyio.EndOfStream:
                    raise H2Error("connection closed by the server") from None
                for event in self._conn.receive_data(data):
                    self._on_event(event)
                await self._writer.flush()
        except (H2Error, anyio.BrokenResourceError, OSError, h2.exceptions.ProtocolError) as exc:
            err = exc if isinstance(exc, H2Error) else H2Error(f"connection failed: {exc}")
            for p in self._pending.values():
                p.reset = -1
                p.done.set()
            try:
                self._send.send_nowait(err)
            except anyio.WouldBlock:
                pass
        finally:
            self.closed.set()

    def _on_event(self, event: Any) -> None:
        assert self._conn is not None and self._writer is not None
        if isinstance(event, h2.events.ResponseReceived):
            p = self._pending.get(event.stream_id)
            if p is not None:
                p.headers = {_text(k): _text(v) for k, v in event.headers}
                p.status = int(p.headers.get(":status", "0"))
        elif isinstance(event, h2.events.DataReceived):
            self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            p = self._pending.get(event.stream_id)
            if event.stream_id == self._push_stream and p is not None and p.status == 200:
                self._buf += event.data
                self._records()
            elif p is not None:
                p.body += event.data
        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            p = self._pending.pop(event.stream_id, None)
            if p is not None:
                if isinstance(event, h2.events.StreamReset):
                    p.reset = int(event.error_code)
                p.done.set()
            if event.stream_id == self._push_stream:
                self._push_stream = None
                if p is not None:
                    self.push_refusal = (p.status, bytes(p.body))
                raise H2Error(f"the server ended the push stream ({p.status if p else '?'})")
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._writer.window_opened()
        elif isinstance(event, h2.events.ConnectionTerminated):
            raise H2Error(f"server sent GOAWAY ({event.error_code!r})")

    def _records(self) -> None:
        while len(self._buf) >= 4:
            (size,) = _LEN.unpack_from(self._buf)
            if size > MAX_RECORD:
                raise H2Error(f"push record of {size} bytes is over the limit")
            if len(self._buf) < 4 + size:
                return
            raw = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            rec = msgpack.unpackb(raw, raw=False)
            if not isinstance(rec, dict) or rec.get("t") != "desired":
                continue
            update = DesiredUpdate(
                int(rec["v"]),
                bytes(rec["m"]),
                bytes(rec["s"]),
                {str(k): bytes(v) for k, v in rec.get("b", {}).items()},
            )
            try:
                self._send.send_nowait(update)
            except anyio.WouldBlock:
                raise H2Error("the device fell behind by 16 desired states") from None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self._conn is None or self._writer is None or self.closed.is_set():
            raise H2Error("not connected")
        sid = self._conn.get_next_available_stream_id()
        pending = self._pending[sid] = _Pending()
        headers = [
            (":method", method),
            (":scheme", "https"),
            (":authority", self.host),
            (":path", path),
        ]
        if body:
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        self._conn.send_headers(sid, headers, end_stream=not body)
        self.counters.requests += 1
        await self._writer.flush()
        if body:
            await self._writer.send_data(sid, body, end_stream=True)
        await pending.done.wait()
        if pending.reset is not None:
            raise H2Error(f"stream {sid} reset ({pending.reset})")
        return pending.status, bytes(pending.body)

    async def next_desired(self) -> DesiredUpdate:
        while True:
            item = await self._recv.receive()
            if isinstance(item, BaseException):
                raise item
            if item.version <= self._version:
                continue
            self.blobs.update(item.blobs)
            self._version = item.version
            self.counters.updates += 1
            return item

    async def post_status(
        self,
        deployment_id: str,
        manifest_version: int,
        state: StatusState,
        components: list[dict[str, Any]],
        error: dict[str, str] | None = None,
    ) -> None:
        doc = status_document(
            deployment_id, self.device_id, manifest_version, state, components, error
        )
        status, body = await self.request(
            "POST", f"/api/v1/deployments/{deployment_id}/status", json.dumps(doc).encode()
        )
        if status not in (200, 201):
            raise H2Error(f"status refused: {status} {body[:300]!r}")


__all__ = ["H2Error", "H2PushClient"]
