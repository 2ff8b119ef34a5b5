"""Issue the controller's fleet-manager certificate for one tenant (``margo-certs init``).

``DIR/<tenant>/controller/cert.pem`` + ``key.pem`` (0600), signed by the tenant's CA:

- exactly one URI SAN, ``spiffe://<tenant>/margo/wfm/<id>`` (id ``controller`` unless
  ``--wfm-id`` says otherwise; a later ``init`` without ``--wfm-id`` keeps the id it finds);
- DNS SANs: the tenant name (the TLS server name agents send) and every ``--host`` name;
  IP SANs: every ``--host`` address; EKU serverAuth only; KeyUsage digitalSignature.

Like the rest of ``init`` it is idempotent: a certificate that says what is wanted, chains to
the tenant CA and has not expired is kept. Otherwise (``--host`` or ``--wfm-id`` changed, the
tenant CA was rotated, it expired) the certificate is reissued; its key is kept when present.
Nobody pins this leaf (agents trust the tenant CA), so reissuing it is always safe.

This module does not import ``pki.py`` (``pki.py`` calls it); it builds its own leaf.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from margo_stream.errors import ConfigError, IdentityError
from margo_stream.fsutil import atomic_write
from margo_stream.identity.fleet_manager import (
    DEFAULT_WFM_ID,
    FLEET_MANAGER_DIR,
    WFM_PATH_PREFIX,
    uri_sans,
    validate_wfm_id,
    wfm_spiffe_id,
)
from margo_stream.identity.spiffe import parse_spiffe_id

CLOCK_SKEW = timedelta(minutes=5)
KEY_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700

# (label, (cert.pem, key.pem), action): pki.py wraps it in its FileGroup
Outcome = tuple[str, tuple[Path, Path], str]


def check_wfm_id(wfm_id: str | None) -> None:
    """ConfigError for a ``--wfm-id`` that is not ``[A-Za-z0-9._~-]+`` (checked up front)."""
    if wfm_id is not None:
        try:
            validate_wfm_id(wfm_id)
        except IdentityError as exc:
            raise ConfigError(f"--wfm-id: {exc}") from None


def ensure_fleet_manager_cert(
    tdir: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: tuple[Sequence[str], Sequence[str]],
    days: int,
    wfm_id: str | None = None,
    *,
    now: datetime | None = None,
) -> Outcome:
    """Issue, keep or reissue ``tdir/controller/{cert.pem,key.pem}`` for the tenant ``tdir``
    is the directory of; ``hosts`` is (DNS names, IP addresses). Says what it did."""
    check_wfm_id(wfm_id)
    tenant = tdir.name
    now = now or datetime.now(UTC).replace(microsecond=0)
    dns_names, ip_addresses = hosts
    fdir = tdir / FLEET_MANAGER_DIR
    fdir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    cert_path, key_path = fdir / "cert.pem", fdir / "key.pem"
    paths = (cert_path, key_path)
    dns = list(dict.fromkeys([tenant, *(d.lower() for d in dns_names)]))
    ips = list(dict.fromkeys(str(ipaddress.ip_address(i)) for i in ip_addresses))
    label = f"{tenant} fleet-manager certificate"
    have_cert, have_key = cert_path.exists(), key_path.exists()
    old = _read_cert(cert_path) if have_cert else None
    wanted_id = wfm_id or (_wfm_id_of(old, tenant) if old is not None else None) or DEFAULT_WFM_ID
    uri = wfm_spiffe_id(tenant, wanted_id)
    key = _read_key(key_path) if have_key else None
    if old is not None and key is not None:
        why = _why_reissue(old, key, ca_cert, uri, dns, ips, now)
        if why is None:
            return f"{label} {uri}", paths, "kept"
        label = f"{label} {uri} ({why})"
        action = "reissued"
    else:
        label = f"{label} {uri} for {', '.join([*dns, *ips])}"
        action = "completed" if (have_cert or have_key) else "written"
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
        atomic_write(key_path, _key_pem(key), mode=KEY_MODE)
    cert = _issue(ca_cert, ca_key, key, uri, dns, ips, days, now)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE)
    return label, paths, action


def _why_reissue(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    uri: str,
    dns: list[str],
    ips: list[str],
    now: datetime,
) -> str | None:
    """Why the existing certificate is not what is wanted (``None``: keep it)."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        return "its key.pem does not match it"
    if uri_sans(cert) != [uri]:
        return f"it named {', '.join(uri_sans(cert)) or 'no URI'}"
    if _names(cert) != {*dns, *ips}:
        return "its names differ from the tenant and --host"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "it was not issued by the current tenant CA"
    if cert.not_valid_after_utc <= now:
        return "it expired"
    return None


def _names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return set(san.get_values_for_type(x509.DNSName)) | ips


def _wfm_id_of(cert: x509.Certificate, tenant: str) -> str | None:
    """The id in an existing ``spiffe://<tenant>/margo/wfm/<id>``, if that is what it names."""
    for uri in uri_sans(cert):
        try:
            spiffe = parse_spiffe_id(uri)
        except IdentityError:
            continue
        segments = spiffe.segments
        if spiffe.trust_domain == tenant and len(segments) == 3 and segments[:2] == WFM_PATH_PREFIX:
            return segments[2]
    return None


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    uri: str,
    dns: list[str],
    ips: list[str],
    days: int,
    now: datetime,
) -> x509.Certificate:
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    usage = dict.fromkeys(
        (
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, **usage), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256())


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read certificate: {exc}") from None


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: expected an ECDSA private key, found {type(key).__name__}")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


__all__ = ["Outcome", "check_wfm_id", "ensure_fleet_manager_cert"]
