"""The PKI layout: what init_pki and issue_device write, and what they refuse."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from margo_stream.errors import ConfigError, IdentityError
from margo_stream.identity.pki import init_pki, issue_device, split_hosts
from margo_stream.identity.trust import read_certificates

SECRET_FILES = ["ca.key", "signing.key", "operator.token"]


def ext(cert: x509.Certificate, cls: type) -> object:
    return cert.extensions.get_extension_for_class(cls).value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["acme", "globex"], ["localhost", "127.0.0.1", "::1", "ctl.example"])
    return d


def test_tenant_ca(pki: Path) -> None:
    (ca,) = read_certificates(pki / "acme" / "ca.pem")
    bc = ext(ca, x509.BasicConstraints)
    assert bc.ca and bc.path_length == 0
    ku = ext(ca, x509.KeyUsage)
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    san = ext(ca, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://acme"]
    for name in SECRET_FILES:
        assert mode(pki / "acme" / name) == 0o600, name
    token = (pki / "acme" / "operator.token").read_text()
    assert token.endswith("\n") and len(token.strip()) >= 40 and token.count("\n") == 1


def test_tenants_have_their_own_keys(pki: Path) -> None:
    (acme,) = read_certificates(pki / "acme" / "ca.pem")
    (globex,) = read_certificates(pki / "globex" / "ca.pem")
    assert acme.public_key() != globex.public_key()
    assert (pki / "acme" / "signing.pub").read_bytes() != (
        pki / "globex" / "signing.pub"
    ).read_bytes()


def test_controller_server_cert(pki: Path) -> None:
    (cert,) = read_certificates(pki / "controller" / "cert.pem")
    (ca,) = read_certificates(pki / "controller" / "ca.pem")
    cert.verify_directly_issued_by(ca)
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "ctl.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert mode(pki / "controller" / "key.pem") == 0o600
    assert mode(pki / "controller" / "ca.key") == 0o600


def test_device_certificate(pki: Path) -> None:
    ddir = issue_device(pki, "acme", "press-01", days=7)
    assert ddir == pki / "acme" / "devices" / "press-01"
    certs = read_certificates(ddir / "cert.pem")
    leaf = certs[0]
    (acme_ca,) = read_certificates(pki / "acme" / "ca.pem")
    leaf.verify_directly_issued_by(acme_ca)
    san = ext(leaf, x509.SubjectAlternativeName)
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://acme/margo/client/press-01")]
    assert list(ext(leaf, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = ext(leaf, x509.KeyUsage)
    assert ku.digital_signature and not ku.key_cert_sign
    assert ext(leaf, x509.BasicConstraints).ca is False
    assert leaf.subject.rfc4514_string() == "CN=press-01"
    lifetime = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=6, hours=23) < lifetime <= timedelta(days=7)
    assert mode(ddir / "key.pem") == 0o600
    assert (ddir / "ca.pem").read_bytes() == (pki / "acme" / "ca.pem").read_bytes()  # own tenant
    assert (ddir / "signing.pub").read_bytes() == (pki / "acme" / "signing.pub").read_bytes()
    again = read_certificates(issue_device(pki, "acme", "press-01") / "cert.pem")[0]
    assert again.serial_number != leaf.serial_number


def test_unknown_tenant(pki: Path) -> None:
    with pytest.raises(ConfigError, match="unknown tenant 'initech'"):
        issue_device(pki, "initech", "press-01")
    with pytest.raises(ConfigError, match="unknown tenant 'controller'"):
        issue_device(pki, "controller", "press-01")


def test_bad_device_id(pki: Path) -> None:
    with pytest.raises(IdentityError, match="device id"):
        issue_device(pki, "acme", "../escape")


def test_reinit_keeps_everything_and_adds_tenant(pki: Path) -> None:
    before = {p: p.read_bytes() for p in pki.rglob("*") if p.is_file()}
    groups = init_pki(pki, ["acme", "initech"], ["localhost", "127.0.0.1", "::1", "ctl.example"])
    assert {g.action for g in groups if "initech" not in g.label} == {"kept"}
    assert {g.action for g in groups if "initech" in g.label} == {"written"}
    assert all(p.read_bytes() == data for p, data in before.items())
    assert (pki / "initech" / "ca.pem").exists()


def test_reinit_completes_after_crash_between_key_and_cert(tmp_path: Path) -> None:
    init_pki(tmp_path, ["acme"], ["localhost"])
    key = (tmp_path / "acme" / "ca.key").read_bytes()
    (tmp_path / "acme" / "ca.pem").unlink()
    groups = init_pki(tmp_path, ["acme"], ["localhost"])
    assert [g.action for g in groups if g.label == "acme tenant CA"] == ["completed"]
    assert (tmp_path / "acme" / "ca.key").read_bytes() == key


def test_reinit_refuses_cert_without_key(tmp_path: Path) -> None:
    init_pki(tmp_path, ["acme"], ["localhost"])
    (tmp_path / "acme" / "signing.key").unlink()
    with pytest.raises(ConfigError, match="signing.key is missing"):
        init_pki(tmp_path, ["acme"], ["localhost"])


@pytest.mark.parametrize("tenant", ["Acme", "controller", "a/b", ""])
def test_bad_tenant_names(tmp_path: Path, tenant: str) -> None:
    with pytest.raises(ConfigError):
        init_pki(tmp_path, [tenant], ["localhost"])
    assert not (tmp_path / "controller").exists()


@pytest.mark.parametrize("host", ["", "bad host", "-x.example", "a..b"])
def test_bad_hosts(host: str) -> None:
    with pytest.raises(ConfigError, match="--host"):
        split_hosts([host])
