"""PeerVerifier: the happy path and every refusal, with real keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from margo_stream.errors import PeerRejected
from margo_stream.identity.pki import (
    init_pki,
    issue_device,
    load_tenant_ca,
    make_ca,
    make_leaf,
)
from margo_stream.identity.trust import load_trust_bundles, read_certificates
from margo_stream.identity.verify import PeerVerifier

NOW = datetime.now(UTC).replace(microsecond=0)
ACME_DEVICE = "spiffe://acme/margo/client/press-01"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["acme", "globex"], ["localhost"])
    return d


@pytest.fixture(scope="module")
def verifier(pki: Path) -> PeerVerifier:
    return PeerVerifier(load_trust_bundles(pki))


def leaf(
    pki: Path,
    tenant: str = "acme",
    *,
    uris: list[str] | None = None,
    days: int = 30,
    not_before: datetime | None = None,
    eku: tuple = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> x509.Certificate:
    ca, key = load_tenant_ca(pki, tenant)
    cert, _ = make_leaf(
        ca,
        key,
        uris=[ACME_DEVICE] if uris is None else uris,
        not_before=not_before or NOW - timedelta(minutes=5),
        not_after=(not_before or NOW) + timedelta(days=days),
        eku=eku,
        common_name="press-01",
    )
    return cert


def rejected(
    verifier: PeerVerifier,
    cert: x509.Certificate | None,
    chain: list[x509.Certificate] | None = None,
) -> str:
    with pytest.raises(PeerRejected) as info:
        verifier.verify(cert, chain or [])
    reason = info.value.reason
    assert reason and "\n" not in reason
    return reason


def test_happy_path_issued_device(pki: Path, verifier: PeerVerifier) -> None:
    ddir = issue_device(pki, "acme", "press-01")
    certs = read_certificates(ddir / "cert.pem")
    ident = verifier.verify(certs[0], certs[1:])
    assert ident.tenant == "acme"
    assert ident.device_id == "press-01"
    assert ident.spiffe_id == ACME_DEVICE
    assert ident.not_after == certs[0].not_valid_after_utc
    assert len(ident.fingerprint) == 64


def test_no_certificate(verifier: PeerVerifier) -> None:
    assert rejected(verifier, None) == "no client certificate"


def test_two_uri_sans(pki: Path, verifier: PeerVerifier) -> None:
    cert = leaf(pki, uris=[ACME_DEVICE, "spiffe://acme/margo/client/other"])
    assert "has 2 URI SANs" in rejected(verifier, cert)


def test_no_uri_san(pki: Path, verifier: PeerVerifier) -> None:
    assert "has 0 URI SANs" in rejected(verifier, leaf(pki, uris=[]))


def test_uri_not_spiffe(pki: Path, verifier: PeerVerifier) -> None:
    reason = rejected(verifier, leaf(pki, uris=["https://acme/margo/client/press-01"]))
    assert "not a SPIFFE ID" in reason


def test_unknown_trust_domain(pki: Path, verifier: PeerVerifier) -> None:
    reason = rejected(verifier, leaf(pki, uris=["spiffe://initech/margo/client/press-01"]))
    assert reason == "unknown trust domain 'initech'"


def test_other_tenants_ca_cannot_claim_acme(pki: Path, verifier: PeerVerifier) -> None:
    cert = leaf(pki, "globex", uris=[ACME_DEVICE])
    reason = rejected(verifier, cert)
    assert "does not verify against the 'acme' trust bundle" in reason


def test_self_signed_stranger(verifier: PeerVerifier) -> None:
    ca, key = make_ca("rogue", not_before=NOW - timedelta(1), not_after=NOW + timedelta(9))
    cert, _ = make_leaf(
        ca,
        key,
        uris=[ACME_DEVICE],
        not_before=NOW - timedelta(1),
        not_after=NOW + timedelta(9),
        common_name="press-01",
    )
    assert "'acme' trust bundle" in rejected(verifier, cert, chain=[ca])


def test_expired(pki: Path, verifier: PeerVerifier) -> None:
    cert = leaf(pki, not_before=NOW - timedelta(days=10), days=1)
    reason = rejected(verifier, cert)
    expiry = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert reason == f"certificate expired at {expiry}"


def test_not_yet_valid(pki: Path, verifier: PeerVerifier) -> None:
    cert = leaf(pki, not_before=NOW + timedelta(days=2))
    assert "not yet valid" in rejected(verifier, cert)


@pytest.mark.parametrize("eku", [(ExtendedKeyUsageOID.SERVER_AUTH,), ()])
def test_missing_client_auth(pki: Path, verifier: PeerVerifier, eku: tuple) -> None:
    assert "clientAuth" in rejected(verifier, leaf(pki, eku=eku))


@pytest.mark.parametrize(
    "uri", ["spiffe://acme/margo/wfm/fm1", "spiffe://acme", "spiffe://acme/margo/client/a/b"]
)
def test_not_a_device(pki: Path, verifier: PeerVerifier, uri: str) -> None:
    reason = rejected(verifier, leaf(pki, uris=[uri]))
    assert "not a device id (path must be /margo/client/<id>)" in reason


def test_cached_hit_still_refuses_once_expired(pki: Path) -> None:
    verifier = PeerVerifier(load_trust_bundles(pki))
    # the time now, not at import: the module's CA is made when its first test runs, which in
    # a slow suite is minutes after NOW
    now = datetime.now(UTC).replace(microsecond=0)
    cert = leaf(pki, not_before=now - timedelta(minutes=5), days=1)
    first = verifier.verify(cert, [], now=now)
    assert verifier.verify(cert, [], now=now + timedelta(hours=1)) == first
    assert verifier.hits == 1 and verifier.misses == 1
    later = now + timedelta(days=2)
    with pytest.raises(PeerRejected, match="certificate expired at"):
        verifier.verify(cert, [], now=later)
    assert verifier.cache_len() == 0


def test_cache_is_bounded(pki: Path) -> None:
    verifier = PeerVerifier(load_trust_bundles(pki), cache_size=3)
    for _ in range(5):
        verifier.verify(leaf(pki), [])
    assert verifier.cache_len() == 3


def test_chain_order_is_part_of_cache_key(pki: Path) -> None:
    verifier = PeerVerifier(load_trust_bundles(pki))
    cert = leaf(pki)
    verifier.verify(cert, [])
    ca, _ = load_tenant_ca(pki, "acme")
    verifier.verify(cert, [ca])
    assert verifier.misses == 2


def test_reload_from_dir_drops_removed_tenant(tmp_path: Path) -> None:
    init_pki(tmp_path, ["acme", "globex"], ["localhost"])
    verifier = PeerVerifier.from_dir(tmp_path)
    cert = leaf(tmp_path, "globex", uris=["spiffe://globex/margo/client/m1"])
    assert verifier.verify(cert, []).tenant == "globex"
    (tmp_path / "globex" / "ca.pem").unlink()
    verifier.reload()
    assert verifier.tenants == ["acme"]
    assert rejected(verifier, cert) == "unknown trust domain 'globex'"


def test_reload_with_new_ca_refuses_old_devices(pki: Path) -> None:
    verifier = PeerVerifier(load_trust_bundles(pki))
    cert = leaf(pki)
    verifier.verify(cert, [])
    new_ca, _ = make_ca("acme rotated", not_before=NOW - timedelta(1), not_after=NOW + timedelta(9))
    verifier.reload({"acme": [new_ca]})
    assert "'acme' trust bundle" in rejected(verifier, cert)
