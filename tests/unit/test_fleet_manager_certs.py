"""The controller's per-tenant fleet-manager certificate: what ``init`` issues, keeps and
reissues, and what an agent accepts as its tenant's controller."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from margo_stream.errors import ConfigError, PeerRejected
from margo_stream.identity.fleet_manager import (
    TenantCertificates,
    check_controller_certificate,
    wfm_spiffe_id,
)
from margo_stream.identity.pki import (
    CLOCK_SKEW,
    init_pki,
    issue_device,
    load_tenant_ca,
    make_leaf,
)
from margo_stream.identity.trust import read_certificates

HOSTS = ["localhost", "127.0.0.1", "ctl.example"]


def ext(cert: x509.Certificate, cls: type) -> object:
    return cert.extensions.get_extension_for_class(cls).value


def fm_cert(pki: Path, tenant: str) -> x509.Certificate:
    return read_certificates(pki / tenant / "controller" / "cert.pem")[0]


def actions(groups: list, fragment: str) -> set[str]:
    return {g.action for g in groups if fragment in g.label}


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    init_pki(d, ["acme", "globex"], HOSTS)
    return d


def test_each_tenant_ca_issues_a_fleet_manager_certificate(pki: Path) -> None:
    for tenant in ["acme", "globex"]:
        fdir = pki / tenant / "controller"
        assert stat.S_IMODE((fdir / "key.pem").stat().st_mode) == 0o600
        assert stat.S_IMODE(fdir.stat().st_mode) == 0o700
        leaf = fm_cert(pki, tenant)
        tenant_ca, _ = load_tenant_ca(pki, tenant)
        leaf.verify_directly_issued_by(tenant_ca)
        san = ext(leaf, x509.SubjectAlternativeName)
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://{tenant}/margo/wfm/controller"
        ]
        assert san.get_values_for_type(x509.DNSName) == [tenant, "localhost", "ctl.example"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert list(ext(leaf, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
        assert ext(leaf, x509.BasicConstraints).ca is False
        assert check_controller_certificate(leaf, tenant) == wfm_spiffe_id(tenant)
    # the default identity stays: the controller CA's certificate
    assert (pki / "controller" / "cert.pem").exists()


def test_init_again_keeps_the_certificate(pki: Path) -> None:
    before = {p: p.read_bytes() for p in pki.rglob("*") if p.is_file()}
    groups = init_pki(pki, ["acme", "globex"], HOSTS)
    assert actions(groups, "fleet-manager") == {"kept"}
    assert all(p.read_bytes() == data for p, data in before.items())


def test_changed_hosts_reissue_the_certificate_with_the_same_key(pki: Path) -> None:
    key = (pki / "acme" / "controller" / "key.pem").read_bytes()
    old = fm_cert(pki, "acme")
    groups = init_pki(pki, ["acme"], ["ctl.example", "10.0.0.5"])
    assert actions(groups, "acme fleet-manager") == {"reissued"}
    new = fm_cert(pki, "acme")
    assert new.serial_number != old.serial_number
    assert (pki / "acme" / "controller" / "key.pem").read_bytes() == key
    san = ext(new, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["acme", "ctl.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    # and then it is kept again
    assert actions(init_pki(pki, ["acme"], ["ctl.example", "10.0.0.5"]), "acme fleet") == {"kept"}


def test_wfm_id_is_chosen_once_and_then_kept(pki: Path) -> None:
    groups = init_pki(pki, ["acme"], HOSTS, wfm_id="edge-wfm-1")
    assert actions(groups, "acme fleet-manager") == {"reissued"}
    assert check_controller_certificate(fm_cert(pki, "acme"), "acme") == (
        "spiffe://acme/margo/wfm/edge-wfm-1"
    )
    groups = init_pki(pki, ["acme"], HOSTS)  # no --wfm-id: the issued id stays
    assert actions(groups, "acme fleet-manager") == {"kept"}
    assert "edge-wfm-1" in check_controller_certificate(fm_cert(pki, "acme"), "acme")


def test_bad_wfm_id_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--wfm-id"):
        init_pki(tmp_path / "pki", ["acme"], HOSTS, wfm_id="a/b")
    assert not (tmp_path / "pki").exists()


def test_a_rotated_tenant_ca_reissues_the_certificate(pki: Path) -> None:
    for name in ["ca.pem", "ca.key"]:
        (pki / "acme" / name).rename(pki / "acme" / f"{name}.old")
    groups = init_pki(pki, ["acme"], HOSTS)
    assert actions(groups, "acme fleet-manager") == {"reissued"}
    fm_cert(pki, "acme").verify_directly_issued_by(load_tenant_ca(pki, "acme")[0])


def test_a_lost_certificate_is_issued_again_for_the_kept_key(pki: Path) -> None:
    (pki / "acme" / "controller" / "cert.pem").unlink()
    groups = init_pki(pki, ["acme"], HOSTS)
    assert actions(groups, "acme fleet-manager") == {"completed"}
    assert check_controller_certificate(fm_cert(pki, "acme"), "acme")


def test_a_device_trusts_only_its_own_tenant(pki: Path) -> None:
    ddir = issue_device(pki, "acme", "press-01")
    assert (ddir / "ca.pem").read_bytes() == (pki / "acme" / "ca.pem").read_bytes()
    assert (ddir / "ca.pem").read_bytes() != (pki / "controller" / "ca.pem").read_bytes()


def test_the_server_name_chooses_the_tenant_certificate(pki: Path) -> None:
    chooser = TenantCertificates.from_dir(pki)
    assert chooser.tenants == ["acme", "globex"]
    for tenant in ["acme", "globex"]:
        chosen = chooser.choose(tenant)
        assert chosen is not None and chosen.certificate == fm_cert(pki, tenant)
    assert chooser.choose("ACME.") is chooser.choose("acme")
    assert chooser.choose("localhost") is None and chooser.choose(None) is None
    assert chooser.choose("controller") is None


def _leaf(pki: Path, tenant: str, uris: list[str], eku: tuple = (ExtendedKeyUsageOID.SERVER_AUTH,)):
    ca, key = load_tenant_ca(pki, tenant)
    now = datetime.now(UTC)
    leaf, _ = make_leaf(
        ca,
        key,
        uris=uris,
        not_before=now - CLOCK_SKEW,
        not_after=now + timedelta(days=1),
        eku=eku,
        common_name=tenant,
        dns_names=[tenant],
    )
    return leaf


@pytest.mark.parametrize(
    ("uris", "eku", "reason"),
    [
        (["spiffe://globex/margo/wfm/controller"], None, "trust domain 'globex', not 'acme'"),
        (["spiffe://acme/margo/client/press-01"], None, "not a fleet manager"),
        (["spiffe://acme"], None, "not a fleet manager"),
        ([], None, "0 URI SANs"),
        (["spiffe://acme/margo/wfm/a", "spiffe://acme/margo/wfm/b"], None, "2 URI SANs"),
        (["https://acme/margo/wfm/a"], None, "scheme"),
        (["spiffe://acme/margo/wfm/controller"], (ExtendedKeyUsageOID.CLIENT_AUTH,), "serverAuth"),
        (["spiffe://acme/margo/wfm/controller"], (), "serverAuth"),
    ],
)
def test_the_agent_refuses_anything_but_its_tenants_fleet_manager(
    pki: Path, uris: list[str], eku: tuple | None, reason: str
) -> None:
    leaf = _leaf(pki, "acme", uris, *(() if eku is None else (eku,)))
    with pytest.raises(PeerRejected, match=reason):
        check_controller_certificate(leaf, "acme")


def test_no_certificate_is_refused() -> None:
    with pytest.raises(PeerRejected, match="no certificate"):
        check_controller_certificate(None, "acme")
