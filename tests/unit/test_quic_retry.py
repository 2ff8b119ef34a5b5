"""Retry tokens: what they vouch for, and every way a token that should not open does not;
the Retry packet a real aioquic client follows."""

from __future__ import annotations

import os

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, get_retry_integrity_tag, pull_quic_header

from margo_stream.transport.retry import (
    InvalidToken,
    RetryTokens,
    Validated,
    address_bytes,
)

ADDR = ("192.0.2.7", 40_000)
ODCID = bytes.fromhex("0011223344556677")
SCID = bytes.fromhex("8899aabbccddeeff")


def test_a_token_opens_for_its_address_within_its_lifetime() -> None:
    tokens = RetryTokens(lifetime=10.0)
    token = tokens.issue(ADDR, ODCID, SCID, now=100.0)
    assert tokens.validate(ADDR, token, now=100.0) == Validated(ODCID, SCID)
    assert tokens.validate(ADDR, token, now=110.0) == Validated(ODCID, SCID)


def test_longest_connection_ids_round_trip() -> None:
    tokens = RetryTokens()
    odcid, scid = os.urandom(20), os.urandom(20)
    token = tokens.issue(ADDR, odcid, scid, now=0.0)
    assert tokens.validate(ADDR, token, now=1.0) == Validated(odcid, scid)
    with pytest.raises(ValueError, match="at most 20"):
        tokens.issue(ADDR, os.urandom(21), scid, now=0.0)


def test_an_expired_token_is_refused() -> None:
    tokens = RetryTokens(lifetime=10.0)
    token = tokens.issue(ADDR, ODCID, SCID, now=100.0)
    with pytest.raises(InvalidToken, match="old"):
        tokens.validate(ADDR, token, now=110.5)
    with pytest.raises(InvalidToken, match="old"):  # from the future: a clock gone wrong
        tokens.validate(ADDR, token, now=99.0)


@pytest.mark.parametrize(
    "other",
    [("192.0.2.8", 40_000), ("192.0.2.7", 40_001), ("2001:db8::7", 40_000)],
    ids=["other-ip", "other-port", "other-family"],
)
def test_a_token_from_another_address_is_refused(other: tuple[str, int]) -> None:
    tokens = RetryTokens()
    token = tokens.issue(ADDR, ODCID, SCID, now=0.0)
    with pytest.raises(InvalidToken, match="does not open"):
        tokens.validate(other, token, now=1.0)


def test_ipv4_mapped_ipv6_is_the_same_client() -> None:
    tokens = RetryTokens()
    token = tokens.issue(ADDR, ODCID, SCID, now=0.0)
    mapped = ("::ffff:192.0.2.7", 40_000, 0, 0)
    assert address_bytes(mapped) == address_bytes(ADDR)
    assert tokens.validate(mapped, token, now=1.0) == Validated(ODCID, SCID)


def test_every_altered_byte_is_refused() -> None:
    tokens = RetryTokens()
    token = tokens.issue(ADDR, ODCID, SCID, now=0.0)
    for i in range(len(token)):
        altered = bytearray(token)
        altered[i] ^= 0x01
        with pytest.raises(InvalidToken):
            tokens.validate(ADDR, bytes(altered), now=1.0)


def test_another_process_key_and_garbage_are_refused() -> None:
    token = RetryTokens().issue(ADDR, ODCID, SCID, now=0.0)
    with pytest.raises(InvalidToken, match="does not open"):
        RetryTokens().validate(ADDR, token, now=1.0)  # a restarted controller: a new key
    tokens = RetryTokens()
    for garbage in (b"", b"x", os.urandom(40), os.urandom(len(token)), os.urandom(4000)):
        with pytest.raises(InvalidToken):
            tokens.validate(ADDR, garbage, now=1.0)
    with pytest.raises(InvalidToken, match="address"):
        tokens.validate(("not an address", 1), token, now=1.0)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="lifetime"):
        RetryTokens(lifetime=0)
    with pytest.raises(ValueError, match="32 bytes"):
        RetryTokens(key=b"short")


def test_an_aioquic_client_follows_the_retry_with_the_token() -> None:
    """The Retry packet is well formed: aioquic's client checks its integrity tag, takes the
    new connection ID and repeats its Initial to it, carrying the token, which opens."""
    client = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=["x"], server_name="s")
    )
    server_addr = ("127.0.0.1", 4433)
    client.connect(server_addr, now=0.0)
    first = client.datagrams_to_send(now=0.0)[0][0]
    header = pull_quic_header(Buffer(data=first), host_cid_length=8)
    assert header.packet_type == QuicPacketType.INITIAL and not header.token
    tokens = RetryTokens()
    seen_from = ("127.0.0.1", 50_000)  # the client's address as the server sees it
    retry = tokens.retry_packet(
        seen_from,
        version=header.version or 1,
        client_cid=header.source_cid,
        original_destination_cid=header.destination_cid,
        now=5.0,
    )
    assert len(retry) < 150  # no amplification: far smaller than the 1,200-byte Initial
    parsed = pull_quic_header(Buffer(data=retry), host_cid_length=8)
    assert parsed.packet_type == QuicPacketType.RETRY
    assert parsed.integrity_tag == get_retry_integrity_tag(
        retry[: -len(parsed.integrity_tag)], header.destination_cid, version=parsed.version or 1
    )
    client.receive_datagram(retry, server_addr, now=0.1)
    second = client.datagrams_to_send(now=0.1)[0][0]
    again = pull_quic_header(Buffer(data=second), host_cid_length=8)
    assert again.packet_type == QuicPacketType.INITIAL
    assert again.destination_cid == parsed.source_cid != header.destination_cid
    assert tokens.validate(seen_from, again.token, now=5.5) == Validated(
        header.destination_cid, parsed.source_cid
    )
