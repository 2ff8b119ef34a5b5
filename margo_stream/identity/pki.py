"""Per-tenant PKI for margo-stream, built on ``cryptography``.

Layout written by :func:`init_pki` and :func:`issue_device` (see ``certs/README.md``)::

    DIR/controller/ca.pem, ca.key      CA that issues the controller's server certificate
    DIR/controller/cert.pem, key.pem   the controller's server certificate (serverAuth)
    DIR/<tenant>/ca.pem, ca.key        the tenant's own CA (its SPIFFE trust bundle)
    DIR/<tenant>/signing.key, .pub     Ed25519 key that signs the tenant's desired state
    DIR/<tenant>/operator.token        bearer token for the tenant's operator API
    DIR/<tenant>/devices/<id>/         cert.pem, key.pem, ca.pem, signing.pub for one device

Every X.509 key is ECDSA P-256. Private keys and tokens are written mode 0600, atomically.
``init_pki`` never overwrites an existing key, certificate or token; it only fills in what is
missing. ``issue_device`` always issues a fresh key and certificate (that is how a device's
short-lived certificate is renewed).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from margo_stream.errors import ConfigError, IdentityError
from margo_stream.fsutil import atomic_write
from margo_stream.identity.allowed_files import write_allowed
from margo_stream.identity.fleet_manager_certs import check_wfm_id, ensure_fleet_manager_cert
from margo_stream.identity.spiffe import (
    SCHEME,
    device_spiffe_id,
    validate_device_id,
    validate_tenant,
)
from margo_stream.identity.tenant_files import copy_root_pub, ensure_tenant_authority

CONTROLLER_DIR = "controller"
DEVICES_DIR = "devices"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_CA_DAYS = 825
DEFAULT_DEVICE_DAYS = 90
CLOCK_SKEW = timedelta(minutes=5)  # leaves are back-dated this much
KEY_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700

PrivateKey = ec.EllipticCurvePrivateKey


# --------------------------------------------------------------------------- PEM helpers


def generate_key() -> PrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert_to_pem(c) for c in certs)


def key_to_pem(key: PrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (the file itself is mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_to_pem(key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certs_from_pem(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (ValueError if there is none or one is malformed)."""
    return x509.load_pem_x509_certificates(data)


def key_from_pem(data: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"expected an ECDSA private key, found {type(key).__name__}")
    return key


def public_key_der(key: PublicKeyTypes) -> bytes:
    """SubjectPublicKeyInfo DER of a public key, for comparing keys."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_matches_cert(key: PrivateKey, cert: x509.Certificate) -> bool:
    return public_key_der(key.public_key()) == public_key_der(cert.public_key())


# --------------------------------------------------------------------------- certificates


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def make_ca(
    common_name: str,
    *,
    not_before: datetime,
    not_after: datetime,
    uris: Sequence[str] = (),
    organization: str | None = None,
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed root: BasicConstraints ca=True pathlen 0, keyCertSign + cRLSign."""
    key = key or generate_key()
    name = _name(common_name, organization)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()), key


def make_leaf(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    *,
    uris: Sequence[str],
    not_before: datetime,
    not_after: datetime,
    eku: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    common_name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """An end-entity certificate signed by ``ca_cert``/``ca_key``.

    Low level on purpose: it checks nothing, so tests can craft certificates the verifier must
    refuse (several or no URI SANs, wrong EKU, expired, signed by another tenant's CA). An
    empty ``eku`` leaves the extension out; no URI, DNS or IP leaves the SAN extension out.
    """
    key = key or generate_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True)
class FileGroup:
    """One group of files ``init_pki``/``issue_device`` dealt with, and what it did."""

    label: str
    paths: tuple[Path, ...]
    action: str  # "written", "kept", "completed" (some files kept, missing ones written)

    def describe(self) -> str:
        parent = self.paths[0].parent
        names = ", ".join(p.name for p in self.paths)
        return f"{self.action:<9} {self.label}: {parent}/{{{names}}}"


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _mkdir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        return certs_from_pem(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read certificate: {_one_line(exc)}") from None


def _read_key(path: Path) -> PrivateKey:
    try:
        return key_from_pem(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read private key: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _ensure_ca(
    cert_path: Path,
    key_path: Path,
    label: str,
    *,
    common_name: str,
    uris: Sequence[str],
    organization: str | None,
    days: int,
) -> tuple[FileGroup, x509.Certificate, PrivateKey]:
    """Create a CA pair if missing; reuse an existing key (crash between key and cert)."""
    have_cert, have_key = cert_path.exists(), key_path.exists()
    paths = (cert_path, key_path)
    if have_cert and not have_key:
        raise ConfigError(
            f"{cert_path} exists but {key_path.name} is missing; refusing to replace it "
            f"(move {cert_path.name} away to create a new {label})"
        )
    if have_cert and have_key:
        key = _read_key(key_path)
        cert = _signing_cert(cert_path, key)
        return FileGroup(label, paths, "kept"), cert, key
    key = _read_key(key_path) if have_key else generate_key()
    if not have_key:
        atomic_write(key_path, key_to_pem(key), mode=KEY_MODE)
    now = _now()
    cert, _ = make_ca(
        common_name,
        not_before=now - CLOCK_SKEW,
        not_after=now + timedelta(days=days),
        uris=uris,
        organization=organization,
        key=key,
    )
    atomic_write(cert_path, cert_to_pem(cert), mode=PUBLIC_MODE)
    return FileGroup(label, paths, "completed" if have_key else "written"), cert, key


def _signing_cert(cert_path: Path, key: PrivateKey) -> x509.Certificate:
    """The certificate in a CA bundle that belongs to ``key`` (bundles may hold old CAs too)."""
    for cert in _read_certs(cert_path):
        if key_matches_cert(key, cert):
            return cert
    raise ConfigError(
        f"{cert_path}: no certificate in it matches {cert_path.with_suffix('.key').name}"
    )


def _ensure_server_cert(
    dirpath: Path,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    hosts: Sequence[str],
    days: int,
) -> FileGroup:
    cert_path, key_path = dirpath / "cert.pem", dirpath / "key.pem"
    paths = (cert_path, key_path)
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert and have_key:
        label = "controller server certificate"
        dns, ips = split_hosts(hosts)
        if _server_hosts(_read_certs(cert_path)[0]) != {*dns, *ips}:
            label += f" (its names differ from --host; move {cert_path.name} away to reissue)"
        return FileGroup(label, paths, "kept")
    if have_cert:
        raise ConfigError(
            f"{cert_path} exists but key.pem is missing; move {cert_path.name} away to reissue"
        )
    dns, ips = split_hosts(hosts)
    key = _read_key(key_path) if have_key else generate_key()
    if not have_key:
        atomic_write(key_path, key_to_pem(key), mode=KEY_MODE)
    now = _now()
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    cert, _ = make_leaf(
        ca_cert,
        ca_key,
        uris=(),
        not_before=now - CLOCK_SKEW,
        not_after=not_after,
        eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
        common_name=hosts[0][:64],
        dns_names=dns,
        ip_addresses=ips,
        key=key,
    )
    atomic_write(cert_path, cert_to_pem(cert), mode=PUBLIC_MODE)
    return FileGroup(
        f"controller server certificate for {', '.join(hosts)}",
        paths,
        "completed" if have_key else "written",
    )


def _server_hosts(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return set(san.get_values_for_type(x509.DNSName)) | ips


def split_hosts(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``--host`` values into DNS names and IP addresses (ConfigError if one is neither)."""
    if not hosts:
        raise ConfigError("at least one --host is needed for the controller certificate")
    dns: list[str] = []
    ips: list[str] = []
    for host in hosts:
        try:
            ips.append(str(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        label_ok = all(
            0 < len(part) <= 63
            and part.replace("-", "").replace("_", "").isalnum()
            and part.isascii()
            and not part.startswith("-")
            and not part.endswith("-")
            for part in host.split(".")
        )
        if not host or len(host) > 253 or not label_ok:
            raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name")
        dns.append(host.lower())
    return dns, ips


def _ensure_signing_key(tdir: Path, tenant: str) -> FileGroup:
    key_path, pub_path = tdir / "signing.key", tdir / "signing.pub"
    paths = (key_path, pub_path)
    have_key, have_pub = key_path.exists(), pub_path.exists()
    if have_key and have_pub:
        return FileGroup(f"{tenant} desired-state signing key", paths, "kept")
    if have_pub:
        raise ConfigError(
            f"{pub_path} exists but signing.key is missing; agents pinned that key, so it is not "
            f"replaced silently (move {pub_path.name} away to create a new signing key)"
        )
    if have_key:
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{key_path}: cannot read signing key: {_one_line(exc)}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{key_path}: not an Ed25519 private key")
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        atomic_write(key_path, key_to_pem(key), mode=KEY_MODE)
    atomic_write(pub_path, public_key_to_pem(key.public_key()), mode=PUBLIC_MODE)
    return FileGroup(
        f"{tenant} desired-state signing key (Ed25519)",
        paths,
        "completed" if have_key else "written",
    )


def _ensure_token(tdir: Path, tenant: str) -> FileGroup:
    path = tdir / "operator.token"
    if path.exists():
        return FileGroup(f"{tenant} operator token", (path,), "kept")
    atomic_write(path, (secrets.token_urlsafe(32) + "\n").encode(), mode=KEY_MODE)
    return FileGroup(f"{tenant} operator token", (path,), "written")


def _check_tenants(tenants: Sequence[str]) -> list[str]:
    out: list[str] = []
    for tenant in tenants:
        try:
            validate_tenant(tenant)
        except IdentityError as exc:
            raise ConfigError(str(exc)) from None
        if tenant == CONTROLLER_DIR:
            raise ConfigError(f"tenant name {tenant!r} is reserved for the controller's own CA")
        if tenant not in out:
            out.append(tenant)
    return out


def init_pki(
    dir: Path,
    tenants: list[str],
    hosts: list[str] | None = None,
    days: int = DEFAULT_CA_DAYS,
    wfm_id: str | None = None,
) -> list[FileGroup]:
    """Create (or complete) the PKI under ``dir``; returns what was written and what was kept.

    Existing keys, certificates and tokens are never overwritten: re-running adds tenants and
    fills in missing files only.
    """
    dir = Path(dir)
    hosts = list(hosts) if hosts else list(DEFAULT_HOSTS)
    if days < 1:
        raise ConfigError(f"--days must be at least 1, not {days}")
    tenants = _check_tenants(tenants)
    dns, ips = split_hosts(hosts)  # validate before writing anything
    check_wfm_id(wfm_id)
    groups: list[FileGroup] = []
    _mkdir(dir)
    cdir = dir / CONTROLLER_DIR
    _mkdir(cdir)
    group, ca_cert, ca_key = _ensure_ca(
        cdir / "ca.pem",
        cdir / "ca.key",
        "controller CA",
        common_name="margo-stream controller CA",
        uris=(),
        organization="margo-stream",
        days=days,
    )
    groups.append(group)
    groups.append(_ensure_server_cert(cdir, ca_cert, ca_key, hosts, days))
    for tenant in tenants:
        tdir = dir / tenant
        _mkdir(tdir)
        group, tenant_ca, tenant_key = _ensure_ca(
            tdir / "ca.pem",
            tdir / "ca.key",
            f"{tenant} tenant CA",
            common_name=f"margo-stream tenant {tenant} CA",
            uris=(f"{SCHEME}://{tenant}",),
            organization=tenant,
            days=days,
        )
        groups.append(group)
        wfm = ensure_fleet_manager_cert(tdir, tenant_ca, tenant_key, (dns, ips), days, wfm_id)
        groups.append(FileGroup(*wfm))  # DIR/<tenant>/controller/: the controller, for tenant
        groups.append(_ensure_signing_key(tdir, tenant))
        groups.append(_ensure_token(tdir, tenant))
        groups.extend(FileGroup(*g) for g in ensure_tenant_authority(tdir, tenant))
    return groups


def load_tenant_ca(dir: Path, tenant: str) -> tuple[x509.Certificate, PrivateKey]:
    """The tenant's issuing CA certificate and key; ConfigError naming an unknown tenant."""
    try:
        validate_tenant(tenant)
    except IdentityError as exc:
        raise ConfigError(str(exc)) from None
    tdir = Path(dir) / tenant
    cert_path, key_path = tdir / "ca.pem", tdir / "ca.key"
    if tenant == CONTROLLER_DIR or not cert_path.exists() or not key_path.exists():
        raise ConfigError(
            f"unknown tenant {tenant!r}: {cert_path} or {key_path.name} not found "
            f"(run: margo-certs init --dir {dir} --tenant {tenant})"
        )
    key = _read_key(key_path)
    return _signing_cert(cert_path, key), key


def issue_device(dir: Path, tenant: str, device_id: str, days: int = DEFAULT_DEVICE_DAYS) -> Path:
    """Issue a fresh key and X.509-SVID for one device; returns its identity directory.

    Writes ``DIR/<tenant>/devices/<device-id>/{cert.pem, key.pem, ca.pem, signing.pub}``:
    ``ca.pem`` is the bundle that verifies the controller, ``signing.pub`` the tenant's
    desired-state key the agent pins. The leaf's lifetime is capped at the tenant CA's.
    """
    dir = Path(dir)
    if days < 1:
        raise ConfigError(f"--days must be at least 1, not {days}")
    validate_device_id(device_id)
    ca_cert, ca_key = load_tenant_ca(dir, tenant)
    tenant_bundle = dir / tenant / "ca.pem"  # the agent trusts only its tenant's controller
    signing_pub = dir / tenant / "signing.pub"
    for needed in (tenant_bundle, signing_pub):
        if not needed.exists():
            raise ConfigError(
                f"{needed} not found (run: margo-certs init --dir {dir} --tenant {tenant})"
            )
    now = _now()
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ConfigError(
            f"{dir / tenant / 'ca.pem'}: the tenant CA expired at {ca_cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    cert, key = make_leaf(
        ca_cert,
        ca_key,
        uris=[device_spiffe_id(tenant, device_id)],
        not_before=now - CLOCK_SKEW,
        not_after=not_after,
        eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        common_name=device_id[:64],  # X.509 caps CN at 64; the URI SAN carries the full id
    )
    chain = [ca_cert] if ca_cert.issuer != ca_cert.subject else []  # roots are not sent
    _mkdir(dir / tenant / DEVICES_DIR)
    ddir = dir / tenant / DEVICES_DIR / device_id
    _mkdir(ddir)
    atomic_write(ddir / "key.pem", key_to_pem(key), mode=KEY_MODE)
    atomic_write(ddir / "cert.pem", certs_to_pem([cert, *chain]), mode=PUBLIC_MODE)
    atomic_write(ddir / "ca.pem", tenant_bundle.read_bytes(), mode=PUBLIC_MODE)
    atomic_write(ddir / "signing.pub", signing_pub.read_bytes(), mode=PUBLIC_MODE)
    copy_root_pub(dir / tenant, ddir)  # the tenant's offline root key, what the agent pins
    write_allowed(dir, tenant, device_id, cert)  # the controller's allow-list: DIR/<t>/allowed/
    return ddir


def device_files(identity_dir: Path) -> tuple[Path, ...]:
    d = Path(identity_dir)
    return (d / "cert.pem", d / "key.pem", d / "ca.pem", d / "signing.pub", d / "root.pub")


__all__ = [
    "CONTROLLER_DIR",
    "DEFAULT_HOSTS",
    "DEVICES_DIR",
    "FileGroup",
    "cert_to_pem",
    "certs_from_pem",
    "certs_to_pem",
    "device_files",
    "generate_key",
    "init_pki",
    "issue_device",
    "key_from_pem",
    "key_matches_cert",
    "key_to_pem",
    "load_tenant_ca",
    "make_ca",
    "make_leaf",
    "public_key_der",
    "public_key_to_pem",
    "split_hosts",
]
