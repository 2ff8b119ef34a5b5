"""Stateless reset tokens and datagrams (RFC 9000 section 10.3) and the controller's key."""

from __future__ import annotations

import os
import stat

import pytest

from margo_stream.errors import ConfigError
from margo_stream.transport.stateless_reset import (
    KEY_FILE,
    ResetTokens,
    is_reset,
    load_reset_key,
)


def test_tokens_are_per_key_and_per_connection_id() -> None:
    a, b = ResetTokens(b"a" * 32), ResetTokens(b"b" * 32)
    assert a.token(b"cid-1") == a.token(b"cid-1") and len(a.token(b"cid-1")) == 16
    assert a.token(b"cid-1") != a.token(b"cid-2")
    assert a.token(b"cid-1") != b.token(b"cid-1")


@pytest.mark.parametrize("received, size", [(22, 21), (30, 29), (44, 43), (1200, 43)])
def test_a_reset_is_shorter_than_what_caused_it(received: int, size: int) -> None:
    tokens = ResetTokens(os.urandom(32))
    reset = tokens.reset_for(b"12345678", received)
    assert reset is not None and len(reset) == size
    assert reset[0] & 0xC0 == 0x40  # short header, fixed bit
    assert reset[-16:] == tokens.token(b"12345678")
    assert is_reset(reset, [tokens.token(b"12345678")])


def test_packets_too_short_to_answer_shorter_get_no_reset() -> None:
    assert ResetTokens(os.urandom(32)).reset_for(b"12345678", 21) is None


def test_only_a_short_header_datagram_ending_in_a_known_token_is_a_reset() -> None:
    tokens = ResetTokens(os.urandom(32))
    token = tokens.token(b"cid")
    assert not is_reset(b"\x40" + os.urandom(30) + os.urandom(16), [token])  # other token
    assert not is_reset(b"\xc0" + os.urandom(30) + token, [token])  # long header
    assert not is_reset(b"\x40" + token, [token])  # too short
    assert not is_reset(b"\x40" + os.urandom(30) + token, [])  # no token known yet


def test_the_key_is_created_once_private_and_kept(tmp_path) -> None:
    key = load_reset_key(tmp_path)
    assert len(key) == 32 and load_reset_key(tmp_path) == key
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


def test_a_damaged_key_is_refused_with_what_to_do(tmp_path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"short")
    with pytest.raises(ConfigError, match=r"holds 5 bytes.*remove it"):
        load_reset_key(tmp_path)
