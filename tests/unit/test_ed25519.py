"""The Ed25519 check (libsodium) agrees with cryptography's (OpenSSL) on what signs what."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from margo_stream.identity.ed25519 import signature_ok

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def openssl_ok(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048), flip=st.integers(min_value=0, max_value=64 * 8 - 1))
def test_it_agrees_with_openssl_on_good_and_tampered_signatures(data: bytes, flip: int) -> None:
    pub = KEY.public_key()
    sig = KEY.sign(data)
    assert signature_ok(pub, sig, data) and openssl_ok(pub, sig, data)
    bad = bytearray(sig)
    bad[flip // 8] ^= 1 << (flip % 8)
    assert signature_ok(pub, bytes(bad), data) is openssl_ok(pub, bytes(bad), data) is False
    assert not signature_ok(OTHER.public_key(), sig, data)
    assert not signature_ok(pub, sig, data + b"x")


@pytest.mark.parametrize("signature", [b"", b"\0" * 63, b"\0" * 65, os.urandom(64)])
def test_wrong_length_and_random_signatures_are_refused(signature: bytes) -> None:
    assert not signature_ok(KEY.public_key(), signature, b"manifest")


def test_a_bytearray_signature_is_checked_like_bytes() -> None:
    sig = KEY.sign(b"m")
    assert signature_ok(KEY.public_key(), bytearray(sig), b"m")
    assert not signature_ok(KEY.public_key(), "x" * 64, b"m")  # type: ignore[arg-type]


def test_a_small_order_key_is_refused() -> None:
    # the identity point as a public key: OpenSSL accepts (R = identity, S = 0) under it for
    # every message; libsodium refuses small-order keys outright
    identity = Ed25519PublicKey.from_public_bytes(bytes([1]) + bytes(31))
    forged = bytes([1]) + bytes(31) + bytes(32)
    assert not signature_ok(identity, forged, b"any message")
