"""TLS for the alternative device transports: contexts, handshakes and who the peer is.

The handshake itself (``ssl.CERT_REQUIRED``) checks the client chain against the *union* of
every tenant's CA bundle: OpenSSL cannot choose a bundle by the certificate's SPIFFE ID. That
is only a first gate. :func:`peer_identity` then hands the peer's DER certificate to
``PeerVerifier``, which takes the tenant from the single URI SAN and verifies the chain again
against that tenant's bundle only, so a leaf signed by globex's CA that claims
``spiffe://acme/...`` passes OpenSSL's union check and is refused here. The controller passes
its ``Admission`` (``controller/identities.py``), which then checks the tenant's allow-list.

The server presents the controller's identity of the tenant the client names as its TLS
server name (``DIR/<tenant>/controller/``, the fleet-manager certificate) through
``SSLContext.sni_callback``; a name that is no tenant gets the default identity it was built
with (``DIR/controller/``). Every per-tenant context is built like the default one, so the
client-certificate rules do not depend on the name the client sent.

Python 3.11's ``ssl`` gives the leaf only (no ``get_unverified_chain``), so intermediates are
not passed to the verifier; ``margo-certs`` issues device leaves straight off each tenant's
root, which is what the bundle holds.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSAttribute, TLSStream
from cryptography import x509

from controller.ports import PeerCheck
from margo_stream.errors import PeerRejected
from margo_stream.identity.fleet_manager import fleet_manager_paths
from margo_stream.identity.pki import CONTROLLER_DIR
from margo_stream.identity.spiffe import DeviceIdentity

HANDSHAKE_TIMEOUT = 10.0


def tenant_bundle_paths(certs_dir: Path) -> list[Path]:
    """Every ``DIR/<tenant>/ca.pem`` (the controller's own CA is not a tenant)."""
    root = Path(certs_dir)
    return sorted(
        p / "ca.pem"
        for p in root.iterdir()
        if p.is_dir()
        and p.name != CONTROLLER_DIR
        and not p.name.startswith(".")
        and (p / "ca.pem").exists()
    )


def server_context(
    certfile: str | Path,
    keyfile: str | Path,
    ca_bundle_paths: Sequence[str | Path],
    *,
    alpn: Sequence[str] = (),
    by_server_name: Mapping[str, tuple[Path, Path]] | None = None,
) -> ssl.SSLContext:
    """TLS 1.3 server context that requires a client certificate from any tenant CA and
    presents ``by_server_name[<SNI>]`` (cert, key) when the client names one; by default the
    fleet-manager certificate beside each tenant bundle (``DIR/<tenant>/controller/``)."""
    if by_server_name is None:
        by_server_name = fleet_manager_identities(ca_bundle_paths)
    ctx = _server_context(certfile, keyfile, ca_bundle_paths, alpn)
    by_name = {
        name: _server_context(cert, key, ca_bundle_paths, alpn)
        for name, (cert, key) in by_server_name.items()
    }
    if by_name:

        def choose(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: object) -> None:
            chosen = by_name.get((name or "").lower().rstrip("."))
            if chosen is not None:
                sock.context = chosen

        ctx.sni_callback = choose
    return ctx


def fleet_manager_identities(ca_bundle_paths: Sequence[str | Path]) -> dict[str, tuple[Path, Path]]:
    """``{tenant: (cert.pem, key.pem)}`` for each ``DIR/<tenant>/ca.pem`` whose tenant has a
    fleet-manager certificate (``DIR/<tenant>/controller/``)."""
    found: dict[str, tuple[Path, Path]] = {}
    for bundle in ca_bundle_paths:
        tdir = Path(bundle).parent
        cert, key = fleet_manager_paths(tdir.parent, tdir.name)
        if cert.exists() and key.exists():
            found[tdir.name] = (cert, key)
    return found


def _server_context(
    certfile: str | Path,
    keyfile: str | Path,
    ca_bundle_paths: Sequence[str | Path],
    alpn: Sequence[str],
) -> ssl.SSLContext:
    if not ca_bundle_paths:
        raise ValueError("no tenant CA bundles: a client certificate could never verify")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(certfile), str(keyfile))
    for path in ca_bundle_paths:
        ctx.load_verify_locations(cafile=str(path))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    ctx.options |= ssl.OP_NO_TICKET  # no resumption: every connection presents its certificate
    return ctx


def client_context(
    certfile: str | Path, keyfile: str | Path, cafile: str | Path, *, alpn: Sequence[str] = ()
) -> ssl.SSLContext:
    """TLS 1.3 client context with the device's certificate, verifying the controller."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(cafile))
    ctx.load_cert_chain(str(certfile), str(keyfile))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def identity_from_der(der: bytes | None, verifier: PeerCheck) -> DeviceIdentity:
    """``verifier`` (the controller's: ``PeerVerifier``, then the tenant's allow-list) on a DER
    leaf; ``PeerRejected`` when absent or refused."""
    if not der:
        raise PeerRejected("no client certificate")
    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError:
        raise PeerRejected("client certificate is not valid DER") from None
    return verifier.verify(leaf, [])


def peer_identity(stream: TLSStream, verifier: PeerCheck) -> DeviceIdentity:
    return identity_from_der(stream.extra(TLSAttribute.peer_certificate_binary, None), verifier)


async def accept_tls(
    stream: ByteStream, ctx: ssl.SSLContext, timeout: float = HANDSHAKE_TIMEOUT
) -> TLSStream:
    """Server-side handshake with a deadline (OSError/SSLError/TimeoutError on failure)."""
    with anyio.fail_after(timeout):
        return await TLSStream.wrap(
            stream, server_side=True, ssl_context=ctx, standard_compatible=False
        )


def remote_address(stream: ByteStream) -> str:
    from anyio.abc import SocketAttribute

    addr = stream.extra(SocketAttribute.remote_address, None)
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr) if addr else ""


__all__ = [
    "accept_tls",
    "client_context",
    "fleet_manager_identities",
    "identity_from_der",
    "peer_identity",
    "remote_address",
    "server_context",
    "tenant_bundle_paths",
]
