"""The controller's own identity per tenant: a fleet-manager (Margo "WFM") X.509-SVID.

Each tenant's CA issues the controller a server certificate whose single URI SAN is
``spiffe://<tenant>/margo/wfm/<id>``, kept in ``DIR/<tenant>/controller/{cert.pem,key.pem}``
(``fleet_manager_certs.py`` writes them). The controller presents the certificate of the tenant
named by the TLS server name (SNI); an agent sends its tenant as the server name, trusts only
its tenant's CA, and after the handshake checks with :func:`check_controller_certificate` that
the leaf names a fleet manager of its own trust domain.

``DIR/controller/{cert.pem,key.pem}`` (issued by the controller CA) stays the default identity,
presented when the server name names no tenant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from margo_stream.errors import IdentityError, PeerRejected
from margo_stream.identity.spiffe import (
    SCHEME,
    parse_spiffe_id,
    validate_device_id,
    validate_tenant,
)

WFM_PATH_PREFIX = ("margo", "wfm")
DEFAULT_WFM_ID = "controller"
FLEET_MANAGER_DIR = "controller"  # DIR/<tenant>/controller/
DEFAULT_IDENTITY_DIR = "controller"  # DIR/controller/: the controller CA's server certificate


def wfm_spiffe_id(tenant: str, wfm_id: str = DEFAULT_WFM_ID) -> str:
    """``spiffe://<tenant>/margo/wfm/<id>``, both parts validated (ids as device ids)."""
    validate_tenant(tenant)
    validate_device_id(wfm_id)
    return f"{SCHEME}://{tenant}/{'/'.join(WFM_PATH_PREFIX)}/{wfm_id}"


def validate_wfm_id(wfm_id: str) -> str:
    """A fleet-manager id follows the device-id rules (``[A-Za-z0-9._~-]+``)."""
    try:
        return validate_device_id(wfm_id)
    except IdentityError as exc:
        raise IdentityError(str(exc).replace("device id", "fleet-manager id")) from None


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _has_server_auth(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in eku


def check_controller_certificate(leaf: x509.Certificate | None, tenant: str) -> str:
    """The SPIFFE ID of a controller leaf that may serve ``tenant``; ``PeerRejected`` otherwise.

    The chain was verified by TLS against the agent's bundle (its tenant's CA); this checks
    what the leaf claims: exactly one URI SAN, ``spiffe://<tenant>/margo/wfm/<id>`` of the
    agent's own trust domain, and the serverAuth extended key usage.
    """
    if leaf is None:
        raise PeerRejected("controller presented no certificate")
    uris = uri_sans(leaf)
    if len(uris) != 1:
        raise PeerRejected(
            f"controller certificate has {len(uris)} URI SANs; exactly one "
            f"spiffe://{tenant}/margo/wfm/<id> is required"
        )
    try:
        spiffe = parse_spiffe_id(uris[0])
    except IdentityError as exc:
        raise PeerRejected(f"controller certificate: {exc}") from None
    if spiffe.trust_domain != tenant:
        raise PeerRejected(
            f"controller certificate is for trust domain {spiffe.trust_domain!r}, not {tenant!r}"
        )
    segments = spiffe.segments
    if len(segments) != 3 or segments[:2] != WFM_PATH_PREFIX:
        raise PeerRejected(
            f"controller certificate names '{spiffe}', not a fleet manager "
            f"(spiffe://{tenant}/margo/wfm/<id>)"
        )
    try:
        validate_device_id(segments[2])
    except IdentityError as exc:
        raise PeerRejected(f"controller certificate names '{spiffe}': {exc}") from None
    if not _has_server_auth(leaf):
        raise PeerRejected("controller certificate lacks the serverAuth extended key usage")
    return str(spiffe)


# --------------------------------------------------------------------------- the controller's side


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    """A certificate the controller can present: leaf, the rest of its chain, its key."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    private_key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path


def fleet_manager_paths(certs_dir: Path, tenant: str) -> tuple[Path, Path]:
    """``DIR/<tenant>/controller/cert.pem`` and ``key.pem``."""
    d = Path(certs_dir) / tenant / FLEET_MANAGER_DIR
    return d / "cert.pem", d / "key.pem"


def load_server_certificate(cert_path: Path, key_path: Path) -> ServerCertificate:
    """Read and check a certificate chain and its key; IdentityError naming the file."""
    try:
        certs = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{cert_path}: cannot read the server certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"{key_path}: cannot read the server key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{key_path}: {type(key).__name__}, expected an ECDSA key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != certs[0].public_key().public_bytes(der, spki):
        raise IdentityError(f"{key_path}: key does not match certificate {Path(cert_path).name}")
    return ServerCertificate(certs[0], tuple(certs[1:]), key, Path(cert_path), Path(key_path))


class TenantCertificates:
    """The controller's fleet-manager certificate per tenant, chosen by TLS server name.

    ``choose(server_name)`` returns the certificate of the tenant the name equals, or ``None``
    (the caller then presents its default identity, ``DIR/controller/``).
    """

    def __init__(self, by_tenant: Mapping[str, ServerCertificate]) -> None:
        self.by_tenant = dict(by_tenant)

    @classmethod
    def from_dir(cls, certs_dir: Path, tenants: list[str] | None = None) -> TenantCertificates:
        """Every ``DIR/<tenant>/controller/`` that exists (of ``tenants``, when given)."""
        root = Path(certs_dir)
        names = tenants if tenants is not None else _tenant_dirs(root)
        found: dict[str, ServerCertificate] = {}
        for tenant in names:
            cert_path, key_path = fleet_manager_paths(root, tenant)
            if cert_path.exists() or key_path.exists():
                found[tenant] = load_server_certificate(cert_path, key_path)
        return cls(found)

    def choose(self, server_name: str | None) -> ServerCertificate | None:
        if not server_name:
            return None
        return self.by_tenant.get(server_name.lower().rstrip("."))

    @property
    def tenants(self) -> list[str]:
        return sorted(self.by_tenant)


def _tenant_dirs(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and p.name != DEFAULT_IDENTITY_DIR and not p.name.startswith(".")
    )


__all__ = [
    "DEFAULT_WFM_ID",
    "ServerCertificate",
    "TenantCertificates",
    "check_controller_certificate",
    "fleet_manager_paths",
    "load_server_certificate",
    "uri_sans",
    "validate_wfm_id",
    "wfm_spiffe_id",
]
