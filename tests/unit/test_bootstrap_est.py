"""Bootstrap tokens (one use, bound to tenant and device, expiring) and the EST bodies: CSR in,
one-URI-SAN clientAuth certificate out, PKCS#7 certs-only both ways."""

from __future__ import annotations

import json
import stat
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from margo_stream.errors import ConfigError
from margo_stream.identity.allowed_files import spki_sha256
from margo_stream.identity.bootstrap import (
    BootstrapTokens,
    Refused,
    issue_bootstrap_token,
    parse_duration,
)
from margo_stream.identity.est import (
    CsrError,
    certs_only,
    csr_device_id,
    issue_from_csr,
    load_certs_only,
    load_csr,
    make_csr,
)
from margo_stream.identity.pki import generate_key, init_pki, load_tenant_ca


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki") / "certs"
    init_pki(d, ["acme", "globex"])
    return d


def test_parse_duration():
    assert parse_duration("90s") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("24h") == 86400
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("2.5") == 2.5
    for bad in ("", "abc", "10x", "0s", "-5"):
        with pytest.raises(ConfigError):
            parse_duration(bad, what="--ttl")


def test_token_files(certs):
    path, expires = issue_bootstrap_token(certs, "acme", "press-09", 3600)
    assert path == certs / "acme" / "bootstrap" / "press-09.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["tenant"] == "acme" and record["device"] == "press-09"
    assert record["used_at"] is None and abs(record["expires"] - expires) < 1e-6
    assert path.read_text().strip() not in path.with_suffix(".json").read_text()


def test_token_works_once_for_its_device_and_tenant(certs):
    tokens = BootstrapTokens(certs)
    path, _ = issue_bootstrap_token(certs, "acme", "press-10", 3600)
    token = path.read_text().strip()
    with pytest.raises(Refused) as exc:
        tokens.redeem("acme", "press-11", token)
    assert exc.value.status == 403 and "not bound to device 'press-11'" in exc.value.reason
    with pytest.raises(Refused) as exc:
        tokens.redeem("globex", "press-10", token)
    assert exc.value.status == 403 and "tenant 'globex'" in exc.value.reason
    tokens.redeem("acme", "press-10", token)
    with pytest.raises(Refused) as exc:
        tokens.redeem("acme", "press-10", token)
    assert exc.value.status == 401 and "already used" in exc.value.reason
    with pytest.raises(Refused) as exc:
        tokens.redeem("acme", "press-10", "not-a-token")
    assert exc.value.status == 401 and "unknown" in exc.value.reason


def test_expired_token(certs):
    path, _ = issue_bootstrap_token(certs, "acme", "press-12", 10, now=time.time() - 60)
    with pytest.raises(Refused) as exc:
        BootstrapTokens(certs).redeem("acme", "press-12", path.read_text())
    assert exc.value.status == 401 and "expired" in exc.value.reason


def test_unknown_tenant(certs):
    with pytest.raises(ConfigError, match="unknown tenant"):
        issue_bootstrap_token(certs, "nobody", "press-1", 60)


def test_csr_to_certificate(certs):
    key = generate_key()
    csr = load_csr(make_csr(key, "acme", "press-09"))
    assert csr_device_id(csr) == "press-09"
    ca_cert, ca_key = load_tenant_ca(certs, "acme")
    now = datetime.now(UTC).replace(microsecond=0)
    cert = issue_from_csr(ca_cert, ca_key, csr, "acme", "press-09", 90, now=now)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://acme/margo/client/press-09")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc == now + timedelta(seconds=90)
    assert now - cert.not_valid_before_utc <= timedelta(seconds=5)
    assert spki_sha256(cert) == spki_sha256(key.public_key())
    cert.verify_directly_issued_by(ca_cert)
    (back,) = load_certs_only(certs_only([cert]))
    assert back == cert


def test_bad_csrs():
    with pytest.raises(CsrError, match="base64"):
        load_csr(b"%%%")
    with pytest.raises(CsrError, match="PKCS#10"):
        load_csr(b"AAAA")
    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(CsrError, match="P-256"):
        load_csr(make_csr(other, "acme", "press-09"))
