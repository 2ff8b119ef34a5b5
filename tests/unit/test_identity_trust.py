"""Loading bundles, credentials, tokens and signing keys: every error names its file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from margo_stream.errors import IdentityError
from margo_stream.identity.pki import generate_key, init_pki, issue_device, key_to_pem
from margo_stream.identity.trust import (
    load_device_credentials,
    load_operator_tokens,
    load_server_credentials,
    load_signing_key,
    load_signing_pub,
    load_trust_bundles,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["acme", "globex"], ["localhost"])
    issue_device(d, "acme", "press-01")
    return d


@pytest.fixture
def pki(pristine: Path, tmp_path: Path) -> Path:
    """A private copy each test may damage."""
    d = tmp_path / "certs"
    shutil.copytree(pristine, d)
    return d


def identity_error(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(IdentityError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_trust_bundles(pki: Path) -> None:
    bundles = load_trust_bundles(pki)
    assert sorted(bundles) == ["acme", "globex"]
    assert all(len(cas) == 1 for cas in bundles.values())


def test_trust_bundle_rotation_holds_two_cas(pki: Path) -> None:
    acme = (pki / "acme" / "ca.pem").read_bytes()
    (pki / "acme" / "ca.pem").write_bytes(acme + (pki / "acme" / "ca.pem").read_bytes())
    assert len(load_trust_bundles(pki)["acme"]) == 2


def test_trust_bundle_garbage(pki: Path) -> None:
    (pki / "globex" / "ca.pem").write_text("hello\n")
    msg = identity_error(load_trust_bundles, pki)
    assert str(pki / "globex" / "ca.pem") in msg and "not PEM" in msg


def test_trust_bundle_ca_names_other_tenant(pki: Path) -> None:
    shutil.copy(pki / "acme" / "ca.pem", pki / "globex" / "ca.pem")
    msg = identity_error(load_trust_bundles, pki)
    assert "globex/ca.pem" in msg and "spiffe://acme" in msg


def test_trust_bundles_empty_dir(tmp_path: Path) -> None:
    assert "no tenant trust bundles" in identity_error(load_trust_bundles, tmp_path)


def test_server_credentials(pki: Path) -> None:
    creds = load_server_credentials(pki)
    assert creds.cert_path == pki / "controller" / "cert.pem"
    assert creds.key_path == pki / "controller" / "key.pem"


def test_server_credentials_mismatched_key(pki: Path) -> None:
    (pki / "controller" / "key.pem").write_bytes(key_to_pem(generate_key()))
    msg = identity_error(load_server_credentials, pki)
    assert str(pki / "controller" / "key.pem") in msg and "does not match" in msg


def test_device_credentials(pki: Path) -> None:
    creds = load_device_credentials(pki / "acme" / "devices" / "press-01")
    assert (creds.tenant, creds.device_id) == ("acme", "press-01")
    assert creds.spiffe_id == "spiffe://acme/margo/client/press-01"
    assert creds.ca_path.read_bytes() == (pki / "acme" / "ca.pem").read_bytes()


@pytest.mark.parametrize(
    ("name", "damage", "complaint"),
    [
        ("key.pem", "delete", "device private key is missing"),
        ("cert.pem", "delete", "device certificate is missing"),
        ("ca.pem", "delete", "controller CA bundle is missing"),
        ("signing.pub", "delete", "signing public key is missing"),
        ("cert.pem", "garbage", "not PEM"),
        ("key.pem", "garbage", "not PEM"),
        ("ca.pem", "garbage", "not PEM"),
        ("signing.pub", "garbage", "not PEM"),
        ("key.pem", "other-key", "key does not match certificate cert.pem"),
        ("cert.pem", "truncated", "malformed certificate"),
        ("key.pem", "directory", "is a directory"),
    ],
)
def test_device_credentials_errors(pki: Path, name: str, damage: str, complaint: str) -> None:
    ddir = pki / "acme" / "devices" / "press-01"
    path = ddir / name
    if damage == "delete":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01 not a pem file\n")
    elif damage == "other-key":
        path.write_bytes(key_to_pem(generate_key()))
    elif damage == "truncated":
        text = path.read_text().splitlines()
        path.write_text("\n".join(text[:3] + text[-1:]) + "\n")
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    msg = identity_error(load_device_credentials, ddir)
    assert msg.startswith(str(path) + ":"), msg
    assert complaint in msg


def test_device_credentials_wrong_key_type(pki: Path) -> None:
    ddir = pki / "acme" / "devices" / "press-01"
    (ddir / "key.pem").write_bytes(key_to_pem(ed25519.Ed25519PrivateKey.generate()))
    msg = identity_error(load_device_credentials, ddir)
    assert "key.pem" in msg and "expected an ECDSA key" in msg


def test_device_credentials_missing_dir(tmp_path: Path) -> None:
    assert "identity directory is missing" in identity_error(
        load_device_credentials, tmp_path / "nope"
    )


def test_operator_tokens(pki: Path) -> None:
    tokens = load_operator_tokens(pki)
    assert sorted(tokens.values()) == ["acme", "globex"]
    acme_token = (pki / "acme" / "operator.token").read_text().strip()
    assert tokens[acme_token] == "acme"


def test_operator_token_duplicate(pki: Path) -> None:
    shutil.copy(pki / "acme" / "operator.token", pki / "globex" / "operator.token")
    msg = identity_error(load_operator_tokens, pki)
    assert "globex/operator.token" in msg and "same as tenant 'acme'" in msg


def test_operator_token_empty(pki: Path) -> None:
    (pki / "acme" / "operator.token").write_text("\n")
    assert "operator token is empty" in identity_error(load_operator_tokens, pki)


def test_signing_keys(pki: Path) -> None:
    key = load_signing_key(pki, "acme")
    pub = load_signing_pub(pki / "acme" / "devices" / "press-01" / "signing.pub")
    pub.verify(key.sign(b"manifest"), b"manifest")  # raises InvalidSignature on a mismatch
    assert pub.public_bytes_raw() == key.public_key().public_bytes_raw()
    with pytest.raises(InvalidSignature):
        pub.verify(key.sign(b"manifest"), b"another manifest")


def test_signing_key_wrong_type(pki: Path) -> None:
    (pki / "acme" / "signing.key").write_bytes(key_to_pem(generate_key()))
    msg = identity_error(load_signing_key, pki, "acme")
    assert "acme/signing.key" in msg and "expected Ed25519" in msg


def test_signing_pub_missing(tmp_path: Path) -> None:
    msg = identity_error(load_signing_pub, tmp_path / "signing.pub")
    assert msg == f"{tmp_path / 'signing.pub'}: signing public key is missing"
