"""The device's key and certificate change as a pair: a crash at any point of a renewal leaves
(after ``recover_identity``) a key and a certificate that belong together."""

from __future__ import annotations

import os

import pytest

from agent.enroll import recover_identity, store_pair
from agent.renewal import renew_time
from margo_stream.identity.est import issue_from_csr, load_csr, make_csr
from margo_stream.identity.pki import (
    certs_to_pem,
    generate_key,
    init_pki,
    issue_device,
    key_to_pem,
    load_tenant_ca,
)
from margo_stream.identity.trust import load_device_credentials, read_certificates
from margo_stream.identity.trust import read_private_key as read_key


@pytest.fixture
def identity(tmp_path):
    certs = tmp_path / "certs"
    init_pki(certs, ["acme"])
    ddir = issue_device(certs, "acme", "press-1")
    ca_cert, ca_key = load_tenant_ca(certs, "acme")
    key = generate_key()
    csr = load_csr(make_csr(key, "acme", "press-1"))
    cert = issue_from_csr(ca_cert, ca_key, csr, "acme", "press-1", 3600)
    return ddir, key, cert


def _pair_matches(ddir) -> bool:
    cert = read_certificates(ddir / "cert.pem")[0]
    key = read_key(ddir / "key.pem")
    return cert.public_key() == key.public_key()


def test_store_pair(identity):
    ddir, key, cert = identity
    (ddir / "key.pem.next").write_bytes(key_to_pem(key))
    store_pair(ddir, ddir / "key.pem.next", cert)
    assert read_certificates(ddir / "cert.pem")[0] == cert
    assert _pair_matches(ddir) and not (ddir / "key.pem.next").exists()
    load_device_credentials(ddir)


def test_crash_before_any_rename(identity):
    ddir, key, cert = identity
    (ddir / "key.pem.next").write_bytes(key_to_pem(key))
    (ddir / "cert.pem.next").write_bytes(certs_to_pem([cert]))
    recover_identity(ddir)
    assert read_certificates(ddir / "cert.pem")[0] == cert and _pair_matches(ddir)


def test_crash_between_the_renames(identity):
    ddir, key, cert = identity
    (ddir / "key.pem.next").write_bytes(key_to_pem(key))
    (ddir / "cert.pem.next").write_bytes(certs_to_pem([cert]))
    os.replace(ddir / "key.pem.next", ddir / "key.pem")  # the key is new, the cert still old
    assert not _pair_matches(ddir)
    recover_identity(ddir)
    assert _pair_matches(ddir) and not (ddir / "cert.pem.next").exists()


def test_a_stray_certificate_is_dropped(identity):
    ddir, _, cert = identity
    before = (ddir / "cert.pem").read_bytes()
    (ddir / "cert.pem.next").write_bytes(certs_to_pem([cert]))  # no key of ours matches it
    recover_identity(ddir)
    assert (ddir / "cert.pem").read_bytes() == before and not (ddir / "cert.pem.next").exists()


def test_renew_at_two_thirds():
    assert renew_time(100.0, 400.0) == 300.0
