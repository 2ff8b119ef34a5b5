"""EST (RFC 7030) enrolment over HTTPS: devices get their X.509-SVID for a key born on them.

Routes (``--enroll HOST:PORT``; the server presents ``DIR/controller/cert.pem``):

- ``GET  /.well-known/est/cacerts``: every tenant CA (PKCS#7 certs-only, base64);
  ``GET /.well-known/est/<tenant>/cacerts``: that tenant's bundle only (RFC 7030 3.2.2 labels).
- ``POST /.well-known/est/<tenant>/simpleenroll``: a base64 PKCS#10 CSR, authenticated by the
  device's one-time bootstrap token (HTTP Basic ``<device>:<token>`` or ``Bearer <token>``);
  the device id is the CSR's subject CN (and the Basic user name, which must agree).
- ``POST /.well-known/est/<tenant>/simplereenroll``: authenticated by the device's current
  certificate over mutual TLS; the CSR names the same device and a new key.
- Deviation from RFC 7030 (which has no such resources): ``GET /.well-known/est/<tenant>/
  root.pub`` and ``.../signing.pub``, the tenant's offline root key and desired-state key that
  an enrolled device pins (PEM).

Every certificate is issued by the tenant CA, for ``--device-cert-lifetime``, with exactly one
URI SAN and clientAuth, and its key goes on the allow-list (``store.allow_identity``). Refused
attempts answer 401 (token unknown, used, expired; no or bad client certificate) or 403 (token
for another device or tenant; certificate of another device or tenant), with the reason as a
one-line text body; each is logged and recorded as an ``enrolment.refused`` event.

Uvicorn does not expose the client certificate, so like the Margo pull API this is a small
h11 server: TLS (client certificate optional, checked against the union of tenant bundles,
then by ``PeerVerifier`` against the tenant's bundle alone), one request per connection.
"""

from __future__ import annotations

import base64
import binascii
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSAttribute, TLSStream
from cryptography import x509

from controller.device_api.http_messages import header_map
from controller.device_api.tls import accept_tls, remote_address
from controller.store.base import IDENTITY_ALLOWED, Store
from margo_stream.errors import ConfigError, IdentityError, NotFound, PeerRejected
from margo_stream.identity.allowed_files import spki_sha256
from margo_stream.identity.bootstrap import BootstrapTokens, Refused
from margo_stream.identity.est import (
    CERTS_TYPE,
    CsrError,
    certs_only,
    csr_device_id,
    issue_from_csr,
    load_csr,
)
from margo_stream.identity.pki import CONTROLLER_DIR, load_tenant_ca
from margo_stream.identity.spiffe import DeviceIdentity, validate_device_id

log = logging.getLogger("margo.enroll")

PREFIX = "/.well-known/est/"
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 256
_Family = Literal[socket.AddressFamily.AF_INET, socket.AddressFamily.AF_INET6]
# (tenant, device_id, key_sha256, not_after): put the identity on the allow-list
AllowIdentity = Callable[[str, str, str, float], Awaitable[None]]


class PeerCheck(Protocol):
    """Who a client certificate proves (``PeerVerifier``, or the controller's check that adds
    the allow-list), or ``PeerRejected``."""

    def verify(
        self, leaf: x509.Certificate | None, chain: Sequence[x509.Certificate] = ()
    ) -> DeviceIdentity: ...


class _Answer(Exception):
    def __init__(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


def _text(status: int, reason: str) -> _Answer:
    return _Answer(status, (reason + "\n").encode())


class EnrollServer:
    def __init__(
        self,
        certs: Path,
        store: Store,
        verifier: PeerCheck,
        tenants: Sequence[str],
        *,
        lifetime: float,
        allow: AllowIdentity | None = None,
    ) -> None:
        self.certs = Path(certs)
        self.store = store
        self.verifier = verifier
        self.tenants = list(tenants)
        self.lifetime = lifetime
        # store and in-memory allow-list (the controller's IdentityBook.allow); default: store
        self.allow: AllowIdentity = allow or store.allow_identity
        self.tokens = BootstrapTokens(self.certs)
        self.port: int | None = None
        self.counters = {"enrolled": 0, "renewed": 0, "refused": 0}
        self.active = 0
        self.ssl_context = self.context_for(self.tenants)

    def retrust(self, tenants: Sequence[str]) -> Callable[[], None]:
        """The TLS context for ``tenants`` (the tenants' CA bundles as they are now), built and
        checked; returns the swap to call once every other part of a reload is ready."""
        context = self.context_for(tenants)

        def swap() -> None:
            self.tenants = list(tenants)
            self.ssl_context = context

        return swap

    def context_for(self, tenants: Sequence[str]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cdir = self.certs / CONTROLLER_DIR
        try:
            ctx.load_cert_chain(str(cdir / "cert.pem"), str(cdir / "key.pem"))
            for tenant in tenants:
                ctx.load_verify_locations(cafile=str(self.certs / tenant / "ca.pem"))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--enroll: cannot load {cdir}/cert.pem or a tenant CA: {exc}"
            ) from None
        ctx.verify_mode = ssl.CERT_OPTIONAL  # simpleenroll has none; simplereenroll needs one
        ctx.options |= ssl.OP_NO_TICKET
        return ctx

    async def serve(
        self, host: str, port: int, *, task_status: anyio.abc.TaskStatus[EnrollServer]
    ) -> None:
        family: _Family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            listener = await anyio.create_tcp_listener(
                local_host=host, local_port=port, family=family, backlog=256
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on --enroll {host}:{port}: {exc.strerror}") from None
        async with listener, anyio.create_task_group() as tg:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(self)
            await listener.serve(self._connection, task_group=tg)

    # --- one connection, one request -------------------------------------------------------
    async def _connection(self, tcp: anyio.abc.SocketStream) -> None:
        if self.active >= MAX_CONNECTIONS:  # enrolment is rare: a flood gets nothing
            await tcp.aclose()
            return
        self.active += 1
        try:
            await self._one(tcp)
        finally:
            self.active -= 1

    async def _one(self, tcp: anyio.abc.SocketStream) -> None:
        remote = remote_address(tcp)
        try:
            tls = await accept_tls(tcp, self.ssl_context)
        except (OSError, TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            log.info("enrolment TLS handshake from %s failed: %s", remote, exc)
            await tcp.aclose()
            return
        try:
            with anyio.fail_after(30):
                conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
                request, body = await self._read(conn, tls)
                if request is None:
                    return
                try:
                    answer = await self._handle(tls, request, body, remote)
                except _Answer as exc:
                    answer = exc
                await self._send(conn, tls, answer)
        except (anyio.BrokenResourceError, anyio.EndOfStream, OSError, TimeoutError):
            pass
        except h11.ProtocolError as exc:
            log.info("bad enrolment request from %s: %s", remote, exc)
        except Exception:
            log.exception("enrolment connection from %s failed", remote)
        finally:
            with anyio.CancelScope(shield=True):
                await tls.aclose()

    async def _read(self, conn: h11.Connection, tls: TLSStream) -> tuple[Any, bytes]:
        request: Any = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await tls.receive())
                except anyio.EndOfStream:
                    conn.receive_data(b"")
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    await self._send(conn, tls, _text(413, "request body over 64 KiB"))
                    return None, b""
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            else:  # ConnectionClosed before a whole request
                return None, b""

    async def _send(self, conn: h11.Connection, tls: TLSStream, answer: _Answer) -> None:
        headers = [
            (b"content-type", answer.content_type.encode()),
            (b"content-length", str(len(answer.body)).encode()),
            (b"connection", b"close"),
        ]
        if answer.status == 401:
            headers.append((b"www-authenticate", b'Basic realm="margo-est", charset="UTF-8"'))
        if answer.content_type == CERTS_TYPE:
            headers.append((b"content-transfer-encoding", b"base64"))
        out = conn.send(h11.Response(status_code=answer.status, headers=headers))
        out += conn.send(h11.Data(data=answer.body)) + conn.send(h11.EndOfMessage())
        await tls.send(out)

    # --- routes ----------------------------------------------------------------------------
    async def _handle(self, tls: TLSStream, request: Any, body: bytes, remote: str) -> _Answer:
        method = request.method.decode("ascii")
        path = request.target.decode("latin-1").split("?", 1)[0]
        if not path.startswith(PREFIX):
            raise _text(404, f"no such resource {path}")
        parts = path[len(PREFIX) :].split("/")
        if parts == ["cacerts"] and method == "GET":
            every = [c for t in self.tenants for c in self._bundle(t)]
            return _Answer(200, certs_only(every), CERTS_TYPE)
        if len(parts) != 2 or parts[0] not in self.tenants:
            raise _text(404, f"no such resource {path}")
        tenant, op = parts
        if op == "cacerts" and method == "GET":
            return _Answer(200, certs_only(self._bundle(tenant)), CERTS_TYPE)
        if op in ("root.pub", "signing.pub") and method == "GET":
            try:
                return _Answer(
                    200, (self.certs / tenant / op).read_bytes(), "application/x-pem-file"
                )
            except OSError:
                raise _text(404, f"{tenant} has no {op}") from None
        if op in ("simpleenroll", "simplereenroll") and method == "POST":
            headers = header_map(request.headers)
            try:
                if op == "simpleenroll":
                    return await self._enroll(tenant, headers, body, remote)
                return await self._reenroll(tenant, tls, body)
            except Refused as exc:
                await self._refused(tenant, op, exc, remote)
                raise _text(exc.status, exc.reason) from None
        raise _text(405 if op in _OPS else 404, f"{method} {path} is not served")

    def _bundle(self, tenant: str) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates((self.certs / tenant / "ca.pem").read_bytes())

    async def _enroll(
        self, tenant: str, headers: dict[str, str], body: bytes, remote: str
    ) -> _Answer:
        user, token = _credentials(headers.get("authorization", ""))
        csr = _csr(body)
        device = csr_device_id(csr)
        if device is None:
            raise Refused(400, "the CSR's subject has no CN naming the device")
        try:
            validate_device_id(device)
        except IdentityError as exc:
            raise Refused(400, f"the CSR's CN is no device id: {exc}") from None
        if user is not None and user != device:
            raise Refused(403, f"Basic user {user!r} and the CSR's device {device!r} differ")
        self.tokens.redeem(tenant, device, token)
        return await self._issue(tenant, device, csr, "device.enrolled", remote)

    async def _reenroll(self, tenant: str, tls: TLSStream, body: bytes) -> _Answer:
        der = tls.extra(TLSAttribute.peer_certificate_binary, None)
        if not der:
            raise Refused(401, "simplereenroll needs the device's current client certificate")
        try:  # the chain against the tenant's bundle, and the allow-list
            identity = self.verifier.verify(x509.load_der_x509_certificate(der))
        except (PeerRejected, ValueError) as exc:
            raise Refused(403, f"client certificate refused: {exc}") from None
        if identity.tenant != tenant:
            raise Refused(403, f"the client certificate is of tenant {identity.tenant!r}")
        current = spki_sha256(x509.load_der_x509_certificate(der))
        try:  # the store is the source of truth: a revoked identity must enrol again
            record = await self.store.get_identity(tenant, identity.device_id)
        except NotFound:
            raise Refused(403, f"{identity.device_id} is not on the allow-list") from None
        if record.state != IDENTITY_ALLOWED:
            raise Refused(403, f"{identity.device_id} is {record.state}: it must enrol again")
        if record.key_sha256 != current:
            raise Refused(403, "the certificate's key is not the one on the allow-list")
        csr = _csr(body)
        device = csr_device_id(csr)
        if device != identity.device_id:
            raise Refused(403, f"the CSR names {device!r}, the certificate {identity.device_id!r}")
        if spki_sha256(csr.public_key()) == current:
            raise Refused(400, "simplereenroll needs a new key, not the current one")
        return await self._issue(tenant, device, csr, "device.renewed", None)

    async def _issue(
        self, tenant: str, device: str, csr: x509.CertificateSigningRequest, kind: str, remote: Any
    ) -> _Answer:
        ca_cert, ca_key = load_tenant_ca(self.certs, tenant)
        try:
            cert = issue_from_csr(ca_cert, ca_key, csr, tenant, device, self.lifetime)
        except ValueError as exc:
            raise Refused(400, f"cannot issue for this CSR: {exc}") from None
        digest = spki_sha256(cert)
        not_after = cert.not_valid_after_utc.timestamp()
        await self.allow(tenant, device, digest, not_after)
        self.counters["enrolled" if kind == "device.enrolled" else "renewed"] += 1
        payload = {"key_sha256": digest, "not_after": not_after, "remote": remote}
        await self.store.add_event(tenant, kind, device, payload)
        log.info(
            "%s %s/%s until %s",
            "enrolled" if kind == "device.enrolled" else "renewed",
            tenant,
            device,
            cert.not_valid_after_utc.isoformat(),
            extra={"event": kind, "tenant": tenant, "device": device},
        )
        return _Answer(200, certs_only([cert]), CERTS_TYPE)

    async def _refused(self, tenant: str, op: str, exc: Refused, remote: str) -> None:
        self.counters["refused"] += 1
        log.warning(
            "refused %s for tenant %s from %s: %s",
            op,
            tenant,
            remote,
            exc.reason,
            extra={"event": "enrolment-refused", "reason": exc.reason, "remote": remote},
        )
        payload = {"operation": op, "status": exc.status, "reason": exc.reason, "remote": remote}
        try:
            await self.store.add_event(tenant, "enrolment.refused", None, payload)
        except Exception:
            log.exception("could not record the refused enrolment")


_OPS = ("cacerts", "simpleenroll", "simplereenroll", "root.pub", "signing.pub")


def _csr(body: bytes) -> x509.CertificateSigningRequest:
    try:
        return load_csr(body)
    except CsrError as exc:
        raise Refused(400, f"bad CSR: {exc}") from None


def _credentials(authorization: str) -> tuple[str | None, str]:
    """``(Basic user or None, token)`` from an Authorization header (``Refused`` 401 if none)."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return None, value.strip()
    if scheme.lower() == "basic":
        try:
            user, sep, token = (
                base64.b64decode(value.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise Refused(401, "malformed Basic credentials") from None
        if sep and token:
            return user or None, token
    raise Refused(401, "simpleenroll needs a bootstrap token (HTTP Basic or Bearer)")


async def serve_enroll(
    certs: Path,
    store: Store,
    verifier: PeerCheck,
    tenants: Sequence[str],
    host: str,
    port: int,
    *,
    lifetime: float,
    allow: AllowIdentity | None = None,
    task_status: anyio.abc.TaskStatus[EnrollServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve EST until cancelled; ``task_status.started(server)`` once listening."""
    server = EnrollServer(certs, store, verifier, tenants, lifetime=lifetime, allow=allow)
    await server.serve(host, port, task_status=task_status)


__all__ = ["EnrollServer", "serve_enroll"]
