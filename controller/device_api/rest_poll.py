"""Margo rc.3's pull API, served for real: HTTP/1.1 (h11) over mutual TLS, keep-alive.

Routes (workload-management-api-1.0.0-rc.3.yaml; ``/api/v1/clients/{clientId}/...`` of
desired-state.md is accepted as well, with ``clientId`` the certificate's device):

- ``GET  /api/v1/deployments``: the device's state manifest. ``Accept`` negotiates between
  Margo's ``application/vnd.margo.manifest.v1+json`` (the rc.3 projection, the default) and our
  ``application/vnd.margo-stream.desired-state.v1+json`` (the exact signed bytes, with the
  detached Ed25519 signature in ``X-Margo-Stream-Signature``, base64), so a client can verify
  end to end. ``ETag`` is the quoted digest of the body; ``If-None-Match`` gives 304;
  ``Cache-Control: private``; anything else in ``Accept`` gives 406.
- ``GET  /api/v1/deployments/{deploymentId}/{digest}``: the YAML, immutable.
- ``GET  /api/v1/bundles/{digest}``: the manifest's bundle (``application/vnd.margo.bundle.v1+
  tar+gzip``, every deployment document in one deterministic archive), immutable.
- ``GET  /api/v1/x-margo-stream/blobs/{digest}``: an extra file our manifest references.
- ``POST /api/v1/deployments/{deploymentId}/status``: a ``DeploymentStatusManifest``.
- ``PUT  /api/v1/capabilities/{deviceId}``: a ``DeviceCapabilitiesManifest`` (the client's own,
  or, as a see-thru gateway, a device behind it: ``{clientDevice}/child``);
  ``DELETE`` unregisters them (204).

Problems use Margo's registered types where rc.3 defines the condition (``controller.problems``).

Theory of operation: ``DeviceRouter`` maps (verified identity, request) to a ``Response``
without any I/O of its own beyond the store, so the HTTP/2 server reuses it unchanged. Every
read is scoped to the identity's tenant and device: a digest is only served when the device's
newest manifest references it, whatever else the tenant's store holds. Uvicorn does not expose
the peer certificate, hence this small server: accept TCP, handshake TLS with a deadline,
run ``PeerVerifier`` on the leaf, then loop h11 request/response cycles until the peer closes,
an error forces a close, or the connection stays idle for ``idle_timeout``.
"""

from __future__ import annotations

import base64
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSStream

from controller.device_api.backend import DeviceBackend
from controller.device_api.http_messages import header_map, parse_json_body
from controller.device_api.tls import accept_tls, peer_identity, remote_address, server_context
from controller.ports import PeerCheck
from controller.problems import DEVICE_PROBLEMS, Problem
from controller.store.base import Store
from margo_stream.errors import NotFound, PeerRejected, StoreError
from margo_stream.identity.spiffe import DeviceIdentity
from margo_stream.state.bundle import BUNDLE_MEDIA_TYPE
from margo_stream.state.digest import is_digest
from margo_stream.state.manifest import MARGO_MEDIA_TYPE, MEDIA_TYPE

log = logging.getLogger("margo.device_api.rest")

_Family = Literal[socket.AddressFamily.AF_INET, socket.AddressFamily.AF_INET6]

SIGNATURE_HEADER = "x-margo-stream-signature"
VERSION_HEADER = "x-margo-stream-manifest-version"
IMMUTABLE = "private, max-age=31536000, immutable"
MAX_REQUEST_BODY = 1 << 20
SERVER_NAME = b"margo-stream"


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @classmethod
    def problem(cls, err: Problem, instance: str | None = None) -> Response:
        rendered = err.render(DEVICE_PROBLEMS, instance)
        return cls(rendered.status, list(rendered.headers), rendered.body)


# --------------------------------------------------------------------------- negotiation


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    out = []
    for part in accept.split(","):
        bits = [b.strip() for b in part.split(";")]
        if not bits[0]:
            continue
        q = 1.0
        for p in bits[1:]:
            if p.lower().startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        out.append((bits[0].lower(), q))
    return out


def negotiate(accept: str | None, offers: Sequence[str]) -> str | None:
    """The offer the ``Accept`` header prefers (first offer on ties); None means 406."""
    if accept is None or not accept.strip():
        return offers[0]
    ranges = _media_ranges(accept)
    best, best_q = None, 0.0
    for offer in offers:
        main = offer.split("/")[0]
        q, specificity = 0.0, -1
        for rng, rq in ranges:
            spec = 2 if rng == offer else 1 if rng == f"{main}/*" else 0 if rng == "*/*" else -1
            if spec > specificity:
                q, specificity = rq, spec
        if specificity >= 0 and q > best_q:
            best, best_q = offer, q
    return best


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or f'"{etag}"' in tags or etag in tags or f'W/"{etag}"' in tags


# --------------------------------------------------------------------------- router


class DeviceRouter:
    """Margo's device routes for one verified identity at a time."""

    def __init__(self, backend: DeviceBackend) -> None:
        self.backend = backend

    async def handle(
        self,
        identity: DeviceIdentity,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        remote: str = "",
    ) -> Response:
        path = target.split("?", 1)[0]
        try:
            self.backend.seen(identity.tenant, identity.device_id)
            return await self._route(identity, method, path, headers, body, remote)
        except Problem as err:
            return Response.problem(err, path)
        except StoreError as exc:
            log.error("store error serving %s %s: %s", method, path, exc)
            return Response.problem(
                Problem(
                    503,
                    "the controller's store failed; retry later",
                    title="Service unavailable",
                    kind="store-unavailable",
                ),
                path,
            )

    async def _route(
        self,
        ident: DeviceIdentity,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        remote: str,
    ) -> Response:
        parts = path.split("/")
        if parts[:3] != ["", "api", "v1"]:
            raise Problem(404, f"no route {path[:120]!r}", kind="not-found")
        rest = parts[3:]
        if len(rest) >= 2 and rest[0] == "clients":
            if rest[1] != ident.device_id:
                raise Problem(
                    403, "clientId is not the client certificate's device", kind="not-authorized"
                )
            rest = rest[2:]
        if rest == ["deployments"]:
            _allow(method, "GET")
            return await self.manifest(ident, headers)
        if len(rest) == 3 and rest[0] == "deployments" and rest[2] == "status":
            _allow(method, "POST")
            doc = parse_json_body(body)
            await self.backend.put_status(ident.tenant, ident.device_id, doc, rest[1], remote)
            return Response(200)
        if len(rest) == 3 and rest[0] == "deployments":
            _allow(method, "GET")
            return await self.document(ident, rest[1], rest[2], headers)
        if len(rest) == 3 and rest[:2] == ["x-margo-stream", "blobs"]:
            _allow(method, "GET")
            return await self.blob(ident, rest[2], headers)
        if len(rest) == 2 and rest[0] == "bundles":
            _allow(method, "GET")
            return await self.bundle(ident, rest[1], headers)
        if len(rest) >= 2 and rest[0] == "capabilities":
            _allow(method, "PUT", "DELETE")
            device_id = "/".join(rest[1:])
            if method == "DELETE":
                await self.backend.delete_capabilities(
                    ident.tenant, ident.device_id, device_id, remote
                )
                return Response(204)
            doc = parse_json_body(body)
            created = await self.backend.put_capabilities(
                ident.tenant, ident.device_id, device_id, doc, remote
            )
            return Response(201 if created else 200)
        raise Problem(404, f"no route {path[:120]!r}", kind="not-found")

    async def manifest(self, ident: DeviceIdentity, headers: dict[str, str]) -> Response:
        media = negotiate(headers.get("accept"), (MARGO_MEDIA_TYPE, MEDIA_TYPE))
        if media is None:
            raise Problem(
                406,
                f"this server offers {MARGO_MEDIA_TYPE} and {MEDIA_TYPE}",
                kind="server-cannot-generate-response",
            )
        desired = await self.backend.desired(ident.tenant, ident.device_id)
        if desired is None:
            raise Problem(
                404,
                "no desired state has been assigned to this device yet",
                title="Not found",
                kind="no-desired-state",
            )
        signed = media == MEDIA_TYPE
        body, etag = (
            (desired.manifest_bytes, desired.signed_etag)
            if signed
            else (desired.margo_body, desired.margo_etag)
        )
        common = [
            ("etag", f'"{etag}"'),
            ("cache-control", "private"),
            ("vary", "Accept"),
            (VERSION_HEADER, str(desired.version)),
        ]
        if signed:
            common.append((SIGNATURE_HEADER, base64.b64encode(desired.signature).decode()))
        if _etag_matches(headers.get("if-none-match"), etag):
            return Response(304, common)
        return Response(200, [("content-type", media), *common], body)

    async def _referenced(
        self, ident: DeviceIdentity, digest: str, deployment_id: str | None
    ) -> None:
        kind = "blob-not-found" if deployment_id is None else "deployment-not-found"
        if not is_digest(digest):
            raise Problem(404, "not a sha256 digest", kind=kind)
        desired = await self.backend.desired(ident.tenant, ident.device_id)
        ok = False
        if desired is not None:
            if deployment_id is None:
                ok = digest in desired.digests
            else:
                entry = desired.manifest.entry(deployment_id)
                ok = entry is not None and entry.digest == digest
        if not ok:  # 404, never a deletion signal (desired-state.md)
            raise Problem(
                404, "this digest is not part of the device's current desired state", kind=kind
            )

    async def _immutable(
        self,
        ident: DeviceIdentity,
        digest: str,
        headers: dict[str, str],
        content_type: str,
        data: bytes | None = None,
    ) -> Response:
        common = [("etag", f'"{digest}"'), ("cache-control", IMMUTABLE)]
        if _etag_matches(headers.get("if-none-match"), digest):
            return Response(304, common)
        if data is None:
            try:
                data = await self.backend.store.get_blob(ident.tenant, digest)
            except NotFound:
                raise Problem(
                    404, "blob is missing from the store", kind="blob-not-found"
                ) from None
        return Response(200, [("content-type", content_type), *common], data)

    async def document(
        self, ident: DeviceIdentity, deployment_id: str, digest: str, headers: dict[str, str]
    ) -> Response:
        await self._referenced(ident, digest, deployment_id)
        return await self._immutable(ident, digest, headers, "application/yaml")

    async def blob(self, ident: DeviceIdentity, digest: str, headers: dict[str, str]) -> Response:
        await self._referenced(ident, digest, None)
        return await self._immutable(ident, digest, headers, "application/octet-stream")

    async def bundle(self, ident: DeviceIdentity, digest: str, headers: dict[str, str]) -> Response:
        """The bundle of the device's newest manifest; any other digest is 404
        ``invalid-bundle`` (never a deletion signal)."""
        desired = await self.backend.desired(ident.tenant, ident.device_id)
        if desired is None or desired.bundle is None or desired.bundle_digest != digest:
            raise Problem(
                404,
                "this digest is not the bundle of the device's current desired state",
                kind="invalid-bundle",
            )
        return await self._immutable(ident, digest, headers, BUNDLE_MEDIA_TYPE, desired.bundle)


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        listed = ", ".join(allowed)
        raise Problem(
            405,
            f"{method} is not allowed here; use {listed}",
            kind="method-not-allowed",
            errors=[{"field": "method", "message": listed}],
            headers={"allow": listed},
        )


# --------------------------------------------------------------------------- server


class RestPollServer:
    """The HTTP/1.1 server: one task per connection, requests served in order (keep-alive)."""

    def __init__(
        self,
        store: Store,
        verifier: PeerCheck,
        certfile: str | Path,
        keyfile: str | Path,
        ca_bundle_paths: Sequence[str | Path],
        *,
        idle_timeout: float = 120.0,
        touch_interval: float = 5.0,
    ) -> None:
        self.backend = DeviceBackend(store, touch_interval=touch_interval)
        self.router = DeviceRouter(self.backend)
        self.verifier = verifier
        self.ssl_context = server_context(certfile, keyfile, ca_bundle_paths, alpn=["http/1.1"])
        self._identity_files = (certfile, keyfile)
        self.idle_timeout = idle_timeout
        self.port: int | None = None
        self.connections = 0
        self.requests = 0
        self.rejected = 0

    def trust_context(self, ca_bundle_paths: Sequence[str | Path]) -> ssl.SSLContext:
        """A TLS context like this server's with other tenant CA bundles (for a reload)."""
        certfile, keyfile = self._identity_files
        return server_context(certfile, keyfile, ca_bundle_paths, alpn=["http/1.1"])

    def notify(self, tenant: str, device_ids: Sequence[str]) -> None:
        """Pull model: nothing to do; devices see the change at their next poll."""

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[RestPollServer] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        family: _Family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = await anyio.create_tcp_listener(
            local_host=host, local_port=port, family=family, backlog=1024
        )
        async with listener, anyio.create_task_group() as tg:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            tg.start_soon(self.backend.touch_loop)
            task_status.started(self)
            try:
                await listener.serve(self._connection, task_group=tg)
            finally:
                with anyio.CancelScope(shield=True):
                    await self.backend.flush_seen()

    async def _connection(self, tcp: anyio.abc.SocketStream) -> None:
        remote = remote_address(tcp)
        try:
            tls = await accept_tls(tcp, self.ssl_context)
        except (OSError, TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            log.debug("TLS handshake from %s failed: %s", remote, exc)
            await tcp.aclose()
            return
        self.connections += 1
        try:
            try:
                identity: DeviceIdentity | None = peer_identity(tls, self.verifier)
                refusal = None
            except PeerRejected as exc:
                self.rejected += 1
                identity, refusal = None, exc.reason
                log.info("refused client %s: %s", remote, exc.reason)
            await self._serve_http(tls, identity, refusal, remote)
        except (anyio.BrokenResourceError, anyio.EndOfStream, anyio.ClosedResourceError, OSError):
            pass
        except Exception:  # one connection's failure must never stop the server
            log.exception("connection from %s failed", remote)
        finally:
            self.connections -= 1
            with anyio.CancelScope(shield=True):
                await tls.aclose()

    async def _serve_http(
        self, tls: TLSStream, identity: DeviceIdentity | None, refusal: str | None, remote: str
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        while True:
            try:
                request = await self._next(conn, tls, h11.Request)
                if request is None:
                    return
                body = bytearray()
                while True:
                    event = await self._next(conn, tls, (h11.Data, h11.EndOfMessage))
                    if event is None:
                        return
                    if isinstance(event, h11.EndOfMessage):
                        break
                    body += event.data
                    if len(body) > MAX_REQUEST_BODY:
                        raise Problem(
                            413,
                            "request body over 1 MiB",
                            title="Content too large",
                            kind="content-too-large",
                        )
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    bad = Problem(400, str(exc), title="Bad request", kind="invalid-request")
                    await self._send(conn, tls, Response.problem(bad), close=True)
                return
            except Problem as err:
                await self._send(conn, tls, Response.problem(err), close=True)
                return
            self.requests += 1
            target = request.target.decode("latin-1")
            if identity is not None:
                try:  # a kept-alive connection: expired or revoked since the handshake?
                    self.verifier.readmit(identity)
                except PeerRejected as exc:
                    identity, refusal = None, exc.reason
                    log.info("refused client %s: %s", remote, exc.reason)
            if identity is None:
                refused = Problem(
                    403, f"client certificate refused: {refusal}", kind="not-authorized"
                )
                await self._send(conn, tls, Response.problem(refused, target), close=True)
                return
            response = await self.router.handle(
                identity,
                request.method.decode("ascii"),
                target,
                header_map(request.headers),
                bytes(body),
                remote,
            )
            await self._send(conn, tls, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _next(self, conn: h11.Connection, tls: TLSStream, want: Any) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    with anyio.fail_after(self.idle_timeout):
                        data = await tls.receive()
                except (anyio.EndOfStream, TimeoutError):
                    data = b""
                if not data:
                    if conn.their_state in (h11.IDLE, h11.DONE, h11.MUST_CLOSE):
                        return None
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, want):
                return event
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")

    async def _send(
        self, conn: h11.Connection, tls: TLSStream, response: Response, close: bool = False
    ) -> None:
        headers = [(b"server", SERVER_NAME), (b"content-length", str(len(response.body)).encode())]
        if response.status in (204, 304):  # no body, and no Content-Length (RFC 9110)
            headers = [(b"server", SERVER_NAME)]
        headers += [(k.encode(), v.encode()) for k, v in response.headers]
        if close:
            headers.append((b"connection", b"close"))
        out = conn.send(h11.Response(status_code=response.status, headers=headers))
        if response.body and response.status not in (204, 304):
            out += conn.send(h11.Data(data=response.body))
        out += conn.send(h11.EndOfMessage())
        await tls.send(out)


async def serve_rest_poll(
    store: Store,
    verifier: PeerCheck,
    host: str,
    port: int,
    certfile: str | Path,
    keyfile: str | Path,
    ca_bundle_paths: Sequence[str | Path],
    *,
    idle_timeout: float = 120.0,
    task_status: anyio.abc.TaskStatus[RestPollServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the Margo pull API until cancelled; ``task_status.started(server)`` once listening
    (``server.port`` is the bound port, ``server.notify`` a no-op for symmetry)."""
    server = RestPollServer(
        store, verifier, certfile, keyfile, ca_bundle_paths, idle_timeout=idle_timeout
    )
    await server.serve(host, port, task_status=task_status)


__all__ = ["DeviceRouter", "Response", "RestPollServer", "negotiate", "serve_rest_poll"]
