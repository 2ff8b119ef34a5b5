"""Margo's pull model as a device runs it: poll ``GET /api/v1/deployments`` with
``If-None-Match`` every ``interval`` seconds (15 s, as Margo's sandbox agent) over one
keep-alive HTTP/1.1 connection with the device's client certificate.

The client asks for our signed media type so it can verify the manifest end to end (the
signature arrives in ``X-Margo-Stream-Signature``); ``signed=False`` asks for Margo's plain
projection instead and then ``next_desired`` cannot verify anything, which is the point of the
comparison. New documents, extra files and operator certificates are fetched from their
content-addressed URLs, only the ones the client does not hold yet. A broken connection is reopened once per request.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import anyio
import h11

from bench.transports.base import (
    DesiredUpdate,
    StatusState,
    TransportCounters,
    capabilities_document,
    open_tls,
    status_document,
)
from controller.device_api.tls import client_context
from margo_stream.identity.trust import load_device_credentials
from margo_stream.state.digest import sha256_digest
from margo_stream.state.manifest import MARGO_MEDIA_TYPE, MEDIA_TYPE, parse_manifest

SIGNATURE_HEADER = b"x-margo-stream-signature"
MARGO_POLL_INTERVAL = 15.0


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300].decode(errors='replace')}")
        self.status = status
        self.body = body


class RestPollClient:
    name = "rest-poll"

    def __init__(
        self,
        identity_dir: Path,
        host: str,
        port: int,
        *,
        interval: float = MARGO_POLL_INTERVAL,
        signed: bool = True,
        report_capabilities: bool = True,
    ) -> None:
        self.creds = load_device_credentials(identity_dir)
        self.tenant, self.device_id = self.creds.tenant, self.creds.device_id
        self.host, self.port = host, port
        self.interval = interval
        self.signed = signed
        self.report_capabilities = report_capabilities
        self.counters = TransportCounters()
        self._ctx = client_context(
            self.creds.cert_path, self.creds.key_path, self.creds.ca_path, alpn=["http/1.1"]
        )
        self._stream: Any = None
        self._h11: h11.Connection | None = None
        self._lock = anyio.Lock()
        self._etag: str | None = None
        self._version = 0
        self._next_poll = 0.0
        self.blobs: dict[str, bytes] = {}

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        await self._open()
        if self.report_capabilities:
            await self.put_capabilities(capabilities_document(self.device_id))

    async def _open(self) -> None:
        # the tenant as the server name: the controller presents its identity for this tenant
        self._stream = await open_tls(
            self.host, self.port, self._ctx, self.counters, server_hostname=self.tenant
        )
        self._h11 = h11.Connection(h11.CLIENT)

    async def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def __aenter__(self) -> RestPollClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """One exchange on the keep-alive connection (reopened once if it broke)."""
        async with self._lock:
            for attempt in (0, 1):
                if self._stream is None or self._h11 is None or self._h11.our_state is not h11.IDLE:
                    await self.close()
                    await self._open()
                    if attempt or self.counters.requests:
                        self.counters.reconnects += 1
                try:
                    return await self._exchange(method, path, headers or {}, body)
                except (
                    anyio.BrokenResourceError,
                    anyio.EndOfStream,
                    anyio.ClosedResourceError,
                    h11.RemoteProtocolError,
                    OSError,
                ):
                    await self.close()
                    if attempt:
                        raise
            raise AssertionError("unreachable")

    async def _exchange(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        conn, stream = self._h11, self._stream
        assert conn is not None and stream is not None
        hdrs = [("host", f"{self.host}:{self.port}"), *headers.items()]
        if body or method in ("POST", "PUT"):
            hdrs.append(("content-length", str(len(body))))
        out = conn.send(h11.Request(method=method, target=path, headers=hdrs))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        self.counters.requests += 1
        await stream.send(out)
        response: h11.Response | None = None
        data = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive())
                except anyio.EndOfStream:
                    conn.receive_data(b"")
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise anyio.EndOfStream
        assert response is not None
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            await self.close()
        else:
            conn.start_next_cycle()
        return response.status_code, {k.lower(): v for k, v in response.headers}, bytes(data)

    # ------------------------------------------------------------------ Margo API

    async def put_capabilities(self, doc: dict[str, Any]) -> int:
        status, _, body = await self.request(
            "PUT",
            f"/api/v1/capabilities/{self.device_id}",
            {"content-type": "application/json"},
            json.dumps(doc).encode(),
        )
        if status not in (200, 201):
            raise HttpError(status, body)
        return status

    async def poll(self) -> DesiredUpdate | None:
        """One poll: a newer desired state, or None (304, same version, or none assigned)."""
        headers = {"accept": MEDIA_TYPE if self.signed else MARGO_MEDIA_TYPE}
        if self._etag:
            headers["if-none-match"] = f'"{self._etag}"'
        status, hdrs, body = await self.request("GET", "/api/v1/deployments", headers)
        if status == 304:
            self.counters.not_modified += 1
            return None
        if status == 404:
            return None
        if status != 200:
            raise HttpError(status, body)
        etag = hdrs.get(b"etag", b"").decode().strip('"')
        if etag != sha256_digest(body):
            raise HttpError(status, b"ETag does not match the body's digest")
        if self.signed:
            signature = base64.b64decode(hdrs.get(SIGNATURE_HEADER, b""))
            manifest = parse_manifest(body)
            version = manifest.manifest_version
            wanted: dict[str, tuple[str | None, str | None]] = {
                e.digest: (e.deployment_id, None) for e in manifest.deployments
            }
            for e in manifest.deployments:
                for f in e.files:
                    wanted.setdefault(f.digest, (None, f.name))
                if e.certificate is not None:  # the operator's, which the device checks
                    wanted.setdefault(e.certificate, (None, None))
        else:
            signature = b""
            doc = json.loads(body)
            version = int(doc["manifestVersion"])
            wanted = {d["digest"]: (d["deploymentId"], None) for d in doc["deployments"]}
        if version <= self._version:
            self._etag = etag
            return None
        fetched: dict[str, bytes] = {}
        for digest, (dep_id, _name) in sorted(wanted.items()):
            if digest in self.blobs:
                continue
            path = (
                f"/api/v1/deployments/{dep_id}/{digest}"
                if dep_id
                else f"/api/v1/x-margo-stream/blobs/{digest}"
            )
            bstatus, _, data = await self.request("GET", path)
            if bstatus != 200:
                raise HttpError(bstatus, data)
            if sha256_digest(data) != digest:
                raise HttpError(bstatus, f"{path}: digest mismatch".encode())
            fetched[digest] = data
        self.blobs.update(fetched)
        self._etag, self._version = etag, version
        self.counters.updates += 1
        return DesiredUpdate(version, body, signature, fetched)

    async def next_desired(self) -> DesiredUpdate:
        while True:
            delay = self._next_poll - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
            self._next_poll = anyio.current_time() + self.interval
            update = await self.poll()
            if update is not None:
                return update

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
        status, _, body = await self.request(
            "POST",
            f"/api/v1/deployments/{deployment_id}/status",
            {"content-type": "application/json"},
            json.dumps(doc).encode(),
        )
        if status not in (200, 201):
            raise HttpError(status, body)


__all__ = ["HttpError", "MARGO_POLL_INTERVAL", "RestPollClient"]
