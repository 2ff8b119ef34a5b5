"""EST (RFC 7030) message bodies and issuing a device certificate from its CSR.

Both ends use this: the agent makes the CSR with a key born on the device and reads the
PKCS#7 answer; the controller checks the CSR and issues the X.509-SVID with the tenant CA.

Bodies are what RFC 7030 section 4 says: ``application/pkcs10`` requests and
``application/pkcs7-mime; smime-type=certs-only`` answers, base64 of the DER (section 4.1.3,
4.2.3; line breaks are allowed and ignored).
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from margo_stream.identity.spiffe import device_spiffe_id

CSR_TYPE = "application/pkcs10"
CERTS_TYPE = "application/pkcs7-mime; smime-type=certs-only"
MAX_SKEW = timedelta(minutes=5)


class CsrError(ValueError):
    """A CSR the controller will not sign (the message names why)."""


def _b64decode(body: bytes) -> bytes:
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("body is not base64") from None


def make_csr(key: ec.EllipticCurvePrivateKey, tenant: str, device_id: str) -> bytes:
    """The base64 DER body of a PKCS#10 request: CN = device id, one URI SAN (its SPIFFE ID)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id[:64])]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(device_spiffe_id(tenant, device_id))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def load_csr(body: bytes) -> x509.CertificateSigningRequest:
    """A signed, ECDSA P-256 PKCS#10 request from an EST body (``CsrError`` otherwise)."""
    try:
        csr = x509.load_der_x509_csr(_b64decode(body))
    except ValueError as exc:
        raise CsrError(f"not a base64 DER PKCS#10 request ({exc})") from None
    if not csr.is_signature_valid:
        raise CsrError("the request's signature does not verify (proof of possession failed)")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CsrError("the request's key is not ECDSA P-256")
    return csr


def csr_device_id(csr: x509.CertificateSigningRequest) -> str | None:
    """The device id a request names (its subject CN), if any."""
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def issue_from_csr(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    csr: x509.CertificateSigningRequest,
    tenant: str,
    device_id: str,
    lifetime: float,
    *,
    now: datetime | None = None,
) -> x509.Certificate:
    """The device's X.509-SVID for the CSR's key: exactly one URI SAN
    ``spiffe://<tenant>/margo/client/<id>``, clientAuth, valid ``lifetime`` seconds (capped at
    the CA's). Nothing else in the CSR is copied. Back-dated by a twentieth of the lifetime (at
    most five minutes) for clock skew, so two thirds of the span is still two thirds of the
    lifetime."""
    now = now or datetime.now(UTC)
    not_after = min(now + timedelta(seconds=lifetime), ca_cert.not_valid_after_utc)
    skew = min(MAX_SKEW, timedelta(seconds=lifetime / 20))
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - skew)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(device_spiffe_id(tenant, device_id))]
            ),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA256())


def certs_only(certs: list[x509.Certificate]) -> bytes:
    """A base64 PKCS#7 certs-only body (RFC 7030 4.1.3 and 4.2.3)."""
    return base64.encodebytes(pkcs7.serialize_certificates(certs, serialization.Encoding.DER))


def load_certs_only(body: bytes) -> list[x509.Certificate]:
    """The certificates of a base64 PKCS#7 certs-only body (ValueError if malformed)."""
    certs = pkcs7.load_der_pkcs7_certificates(_b64decode(body))
    if not certs:
        raise ValueError("the PKCS#7 answer holds no certificate")
    return certs


__all__ = [
    "CERTS_TYPE",
    "CSR_TYPE",
    "CsrError",
    "certs_only",
    "csr_device_id",
    "issue_from_csr",
    "load_certs_only",
    "load_csr",
    "make_csr",
]
