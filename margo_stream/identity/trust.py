"""Load trust bundles, credentials, operator tokens and signing keys from disk.

Every failure is an ``IdentityError`` whose one-line message starts with the file's path and
says what is wrong with it (missing, unreadable, not PEM, key does not match certificate, ...),
so an operator can fix it without reading a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from margo_stream.errors import IdentityError
from margo_stream.identity.pki import CONTROLLER_DIR, public_key_der
from margo_stream.identity.spiffe import (
    device_spiffe_id,
    parse_device_spiffe_id,
    validate_tenant,
)


@dataclass(frozen=True, slots=True)
class ServerCredentials:
    """The controller's TLS server certificate (leaf first, then any chain) and key."""

    cert_path: Path
    key_path: Path


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """One device's identity directory, checked: files exist, parse, and key matches cert."""

    cert_path: Path
    key_path: Path
    ca_path: Path  # bundle that verifies the controller
    signing_pub_path: Path  # the controller's online key (named again by the root metadata)
    root_pub_path: Path  # the tenant's offline root key: what the agent pins
    tenant: str
    device_id: str
    spiffe_id: str


# --------------------------------------------------------------------------- file readers


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{path}: {what} is missing") from None
    except IsADirectoryError:
        raise IdentityError(f"{path}: {what} is a directory, not a file") from None
    except OSError as exc:
        raise IdentityError(f"{path}: {what} is unreadable ({exc.strerror or exc})") from None


def read_certificates(path: Path, what: str = "certificate file") -> list[x509.Certificate]:
    """All certificates in a PEM file; IdentityError naming the file otherwise."""
    data = _read(path, what)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise IdentityError(f"{path}: {what} is not PEM (no CERTIFICATE block)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(
            f"{path}: {what} has a malformed certificate ({_one_line(exc)})"
        ) from None


def read_private_key(path: Path, what: str = "private key") -> ec.EllipticCurvePrivateKey:
    """An unencrypted ECDSA private key from a PEM file."""
    data = _read(path, what)
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise IdentityError(f"{path}: {what} is not PEM (no PRIVATE KEY block)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise IdentityError(
            f"{path}: {what} is encrypted; margo-stream needs it unencrypted"
        ) from None
    except ValueError as exc:
        raise IdentityError(f"{path}: {what} is malformed ({_one_line(exc)})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{path}: {what} is {type(key).__name__}, expected an ECDSA key")
    return key


def _check_key_matches(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, key_path: Path, cert_path: Path
) -> None:
    if public_key_der(key.public_key()) != public_key_der(cert.public_key()):
        raise IdentityError(f"{key_path}: key does not match certificate {cert_path.name}")


# --------------------------------------------------------------------------- controller side


def load_trust_bundles(certs_dir: Path) -> dict[str, list[x509.Certificate]]:
    """``{tenant: [CA certificates]}`` from every ``DIR/<tenant>/ca.pem`` (not ``controller``).

    A ``ca.pem`` may hold several CAs (old and new during a rotation). A CA that carries a
    ``spiffe://`` URI SAN must name the directory's tenant.
    """
    root = Path(certs_dir)
    if not root.is_dir():
        raise IdentityError(f"{root}: certificate directory is missing")
    bundles: dict[str, list[x509.Certificate]] = {}
    for tdir in sorted(p for p in root.iterdir() if p.is_dir()):
        name = tdir.name
        if name == CONTROLLER_DIR or name.startswith("."):
            continue
        ca_path = tdir / "ca.pem"
        if not ca_path.exists():
            continue
        try:
            validate_tenant(name)
        except IdentityError as exc:
            raise IdentityError(f"{tdir}: directory name is not a tenant ({exc})") from None
        cas = read_certificates(ca_path, "tenant CA bundle")
        for ca in cas:
            _check_ca(ca, name, ca_path)
        bundles[name] = cas
    if not bundles:
        raise IdentityError(
            f"{root}: no tenant trust bundles (expected {root}/<tenant>/ca.pem; "
            "run: margo-certs init --dir DIR --tenant NAME)"
        )
    return bundles


def _check_ca(ca: x509.Certificate, tenant: str, path: Path) -> None:
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise IdentityError(f"{path}: certificate {ca.subject.rfc4514_string()!r} is not a CA")
    try:
        san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://") and uri != f"spiffe://{tenant}":
            raise IdentityError(f"{path}: CA names trust domain {uri!r}, not 'spiffe://{tenant}'")


def load_server_credentials(certs_dir: Path) -> ServerCredentials:
    """``DIR/controller/{cert.pem,key.pem}``, checked to parse and to match each other."""
    cdir = Path(certs_dir) / CONTROLLER_DIR
    cert_path, key_path = cdir / "cert.pem", cdir / "key.pem"
    certs = read_certificates(cert_path, "controller certificate")
    key = read_private_key(key_path, "controller private key")
    _check_key_matches(certs[0], key, key_path, cert_path)
    return ServerCredentials(cert_path, key_path)


def load_operator_tokens(certs_dir: Path) -> dict[str, str]:
    """``{token: tenant}`` from every ``DIR/<tenant>/operator.token``."""
    root = Path(certs_dir)
    if not root.is_dir():
        raise IdentityError(f"{root}: certificate directory is missing")
    tokens: dict[str, str] = {}
    for tdir in sorted(p for p in root.iterdir() if p.is_dir()):
        path = tdir / "operator.token"
        if tdir.name == CONTROLLER_DIR or not path.exists():
            continue
        try:
            token = _read(path, "operator token").decode("ascii").strip()
        except UnicodeDecodeError:
            raise IdentityError(f"{path}: operator token is not ASCII") from None
        if not token:
            raise IdentityError(f"{path}: operator token is empty")
        if len(token) < 16 or any(ch.isspace() for ch in token):
            raise IdentityError(f"{path}: operator token must be one word of 16+ characters")
        if token in tokens:
            raise IdentityError(f"{path}: operator token is the same as tenant {tokens[token]!r}'s")
        tokens[token] = tdir.name
    return tokens


def load_signing_key(certs_dir: Path, tenant: str) -> ed25519.Ed25519PrivateKey:
    """The tenant's Ed25519 desired-state signing key, ``DIR/<tenant>/signing.key``."""
    validate_tenant(tenant)
    path = Path(certs_dir) / tenant / "signing.key"
    data = _read(path, "signing key")
    if b"PRIVATE KEY-----" not in data:
        raise IdentityError(f"{path}: signing key is not PEM (no PRIVATE KEY block)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (TypeError, ValueError) as exc:
        raise IdentityError(f"{path}: signing key is malformed ({_one_line(exc)})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"{path}: signing key is {type(key).__name__}, expected Ed25519")
    return key


def load_signing_pub(path: Path) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key (SubjectPublicKeyInfo PEM)."""
    data = _read(path, "signing public key")
    if b"-----BEGIN PUBLIC KEY-----" not in data:
        raise IdentityError(f"{path}: signing public key is not PEM (no PUBLIC KEY block)")
    try:
        key = serialization.load_pem_public_key(data)
    except (TypeError, ValueError) as exc:
        raise IdentityError(f"{path}: signing public key is malformed ({_one_line(exc)})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise IdentityError(f"{path}: signing public key is {type(key).__name__}, expected Ed25519")
    return key


# --------------------------------------------------------------------------- device side


def load_device_credentials(identity_dir: Path) -> DeviceCredentials:
    """Check a device identity directory (``cert.pem``, ``key.pem``, ``ca.pem``,
    ``signing.pub``, ``root.pub``) and read tenant and device id from the certificate's URI
    SAN."""
    d = Path(identity_dir)
    if not d.is_dir():
        raise IdentityError(f"{d}: identity directory is missing")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    ca_path, pub_path = d / "ca.pem", d / "signing.pub"
    certs = read_certificates(cert_path, "device certificate")
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise IdentityError(
            f"{cert_path}: device certificate has {len(uris)} URI SANs; exactly one SPIFFE ID "
            "is required"
        )
    try:
        tenant, device_id = parse_device_spiffe_id(uris[0])
    except IdentityError as exc:
        raise IdentityError(f"{cert_path}: {exc}") from None
    key = read_private_key(key_path, "device private key")
    _check_key_matches(leaf, key, key_path, cert_path)
    read_certificates(ca_path, "controller CA bundle")
    load_signing_pub(pub_path)
    root_path = d / "root.pub"
    if not root_path.exists():
        raise IdentityError(
            f"{root_path}: the tenant's root key is missing (issued before roots existed? "
            "re-issue the identity with margo-certs device)"
        )
    load_signing_pub(root_path)
    return DeviceCredentials(
        cert_path=cert_path,
        key_path=key_path,
        ca_path=ca_path,
        signing_pub_path=pub_path,
        root_pub_path=root_path,
        tenant=tenant,
        device_id=device_id,
        spiffe_id=device_spiffe_id(tenant, device_id),
    )


__all__ = [
    "DeviceCredentials",
    "ServerCredentials",
    "load_device_credentials",
    "load_operator_tokens",
    "load_server_credentials",
    "load_signing_key",
    "load_signing_pub",
    "load_trust_bundles",
    "read_certificates",
    "read_private_key",
]
