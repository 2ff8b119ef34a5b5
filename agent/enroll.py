"""The device's side of EST (RFC 7030): enrol with a bootstrap token, renew over mutual TLS.

The key pair is generated here, on the device, and written (0600) before anything is sent; the
private key never leaves the device. ``margo-agent enroll`` writes the identity directory the
agent runs from::

    OUTDIR/key.pem, cert.pem          the device's key and X.509-SVID
    OUTDIR/ca.pem                     its tenant's CA bundle (verifies the controller)
    OUTDIR/root.pub, signing.pub      the tenant's offline root and desired-state keys
    OUTDIR/est.json, est-ca.pem       where to renew, and the CA of that EST server

Key and certificate change as a pair: the new certificate goes to ``cert.pem.next`` and the new
key (when there is an old one) to ``key.pem.next``; then the key is renamed over ``key.pem`` and
the certificate over ``cert.pem``. :func:`recover_identity` finishes a pair a crash left half
renamed, so the old pair stays usable until the new one is complete.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from margo_stream.errors import ConfigError, IdentityError, MargoError
from margo_stream.fsutil import atomic_write, fsync_dir
from margo_stream.identity.est import CSR_TYPE, load_certs_only, make_csr
from margo_stream.identity.pki import certs_to_pem, generate_key, key_matches_cert, key_to_pem
from margo_stream.identity.spiffe import device_spiffe_id, validate_device_id, validate_tenant

EST_FILE = "est.json"
EST_CA = "est-ca.pem"
TIMEOUT = 20.0


class EnrolError(MargoError):
    """Enrolment or renewal failed; the message is one line and says why."""


@dataclass(frozen=True, slots=True)
class EstServer:
    base: str  # https://HOST:PORT/.well-known/est/<tenant>
    ca_file: Path  # verifies the EST server's certificate
    target: str  # HOST:PORT, for messages


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _tls(ca_file: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    except FileNotFoundError:
        raise EnrolError(f"--ca-file {ca_file}: not found") from None
    except (OSError, ssl.SSLError) as exc:
        raise EnrolError(f"--ca-file {ca_file}: not a PEM CA bundle ({_one_line(exc)})") from None
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise EnrolError(
                f"{cert}: cannot load the current identity: {_one_line(exc)}"
            ) from None
    return ctx


async def _call(
    server: EstServer, ctx: ssl.SSLContext, method: str, op: str, **kwargs: object
) -> bytes:
    url = f"{server.base}/{op}"
    try:
        async with httpx.AsyncClient(verify=ctx, timeout=TIMEOUT) as client:
            response = await client.request(method, url, **kwargs)  # type: ignore[arg-type]
    except httpx.TimeoutException:
        raise EnrolError(f"no answer from the controller at {server.target}") from None
    except httpx.HTTPError as exc:
        text = _one_line(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            raise EnrolError(
                f"the controller at {server.target} presented a certificate {server.ca_file} "
                f"does not verify ({text})"
            ) from None
        raise EnrolError(f"cannot reach the controller at {server.target}: {text}") from None
    if response.status_code in (401, 403):
        reason = response.text.strip().splitlines()[0] if response.text.strip() else ""
        raise EnrolError(f"{op} refused ({response.status_code}): {reason}")
    if response.status_code != 200:
        raise EnrolError(
            f"{op}: the controller answered {response.status_code}: {response.text.strip()[:200]}"
        )
    return response.content


def _check_issued(
    body: bytes, key: ec.EllipticCurvePrivateKey, tenant: str, device_id: str
) -> x509.Certificate:
    try:
        cert = load_certs_only(body)[0]
    except ValueError as exc:
        raise EnrolError(f"the controller's answer is not a PKCS#7 certificate: {exc}") from None
    if not key_matches_cert(key, cert):
        raise EnrolError("the issued certificate is not for the key this device generated")
    want = device_spiffe_id(tenant, device_id)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [want]:
        raise EnrolError(f"the issued certificate names {uris}, not {want}")
    return cert


def store_pair(outdir: Path, key_path: Path, cert: x509.Certificate) -> None:
    """Install the new certificate, and the key at ``key_path`` if it is not ``key.pem``."""
    atomic_write(outdir / "cert.pem.next", certs_to_pem([cert]), mode=0o644)
    if key_path != outdir / "key.pem":
        os.replace(key_path, outdir / "key.pem")
    os.replace(outdir / "cert.pem.next", outdir / "cert.pem")
    fsync_dir(outdir)


def recover_identity(outdir: Path) -> None:
    """Finish a key and certificate swap that a crash interrupted (see the module doc)."""
    outdir = Path(outdir)
    pending = outdir / "cert.pem.next"
    if not pending.exists():
        return
    from margo_stream.identity.trust import read_certificates, read_private_key

    try:
        cert = read_certificates(pending)[0]
        for key_path in (outdir / "key.pem.next", outdir / "key.pem"):
            if key_path.exists() and key_matches_cert(read_private_key(key_path), cert):
                store_pair(outdir, key_path, cert)
                return
    except IdentityError:
        pass
    pending.unlink(missing_ok=True)


def _read_token(path: Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise EnrolError(f"--token-file {path}: cannot read it ({exc.strerror or exc})") from None
    if not token:
        raise EnrolError(f"--token-file {path}: it is empty")
    return token


async def enroll(
    controller: str, tenant: str, device_id: str, token_file: Path, ca_file: Path, outdir: Path
) -> x509.Certificate:
    """Enrol this device: new key on disk, CSR with the bootstrap token, identity written."""
    try:
        validate_tenant(tenant)
        validate_device_id(device_id)
    except IdentityError as exc:
        raise ConfigError(str(exc)) from None
    token = _read_token(token_file)
    server = EstServer(f"https://{controller}/.well-known/est/{tenant}", Path(ca_file), controller)
    ctx = _tls(server.ca_file)
    outdir = Path(outdir)
    outdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    recover_identity(outdir)
    key = generate_key()
    # born here and on disk before anything is sent; beside a current identity until it works
    key_path = outdir / ("key.pem.next" if (outdir / "cert.pem").exists() else "key.pem")
    atomic_write(key_path, key_to_pem(key), mode=0o600)
    try:
        bundle = load_certs_only(await _call(server, ctx, "GET", "cacerts"))
    except ValueError as exc:
        raise EnrolError(f"cacerts: the controller's answer is not PKCS#7 ({exc})") from None
    root_pub = await _call(server, ctx, "GET", "root.pub")
    signing_pub = await _call(server, ctx, "GET", "signing.pub")
    basic = base64.b64encode(f"{device_id}:{token}".encode()).decode()
    body = await _call(
        server,
        ctx,
        "POST",
        "simpleenroll",
        content=make_csr(key, tenant, device_id),
        headers={"Content-Type": CSR_TYPE, "Authorization": f"Basic {basic}"},
    )
    cert = _check_issued(body, key, tenant, device_id)
    if not any(_issued_by(cert, ca) for ca in bundle):
        raise EnrolError("the issued certificate does not chain to the tenant's CA bundle")
    atomic_write(outdir / "ca.pem", certs_to_pem(bundle), mode=0o644)
    atomic_write(outdir / "root.pub", root_pub, mode=0o644)
    atomic_write(outdir / "signing.pub", signing_pub, mode=0o644)
    atomic_write(outdir / EST_CA, server.ca_file.read_bytes(), mode=0o644)
    est = {"url": server.base, "controller": controller, "ca_file": EST_CA}
    atomic_write(outdir / EST_FILE, json.dumps(est).encode(), mode=0o644)
    store_pair(outdir, key_path, cert)
    return cert


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # InvalidSignature, ValueError, TypeError: not this CA
        return False
    return True


def est_server(outdir: Path) -> EstServer | None:
    """Where this identity renews (``None``: it was not enrolled over EST)."""
    try:
        info = json.loads((Path(outdir) / EST_FILE).read_text())
        return EstServer(info["url"], Path(outdir) / info["ca_file"], info["controller"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def reenroll(
    outdir: Path, server: EstServer, tenant: str, device_id: str
) -> x509.Certificate:
    """Renew over mutual TLS with the current pair: a new key, generated here."""
    outdir = Path(outdir)
    ctx = _tls(server.ca_file, outdir / "cert.pem", outdir / "key.pem")
    key = generate_key()
    key_path = outdir / "key.pem.next"
    atomic_write(key_path, key_to_pem(key), mode=0o600)
    body = await _call(
        server,
        ctx,
        "POST",
        "simplereenroll",
        content=make_csr(key, tenant, device_id),
        headers={"Content-Type": CSR_TYPE},
    )
    cert = _check_issued(body, key, tenant, device_id)
    store_pair(outdir, key_path, cert)
    return cert


__all__ = ["EnrolError", "EstServer", "enroll", "est_server", "recover_identity", "reenroll"]
