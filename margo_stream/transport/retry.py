"""Stateless QUIC Retry (RFC 9000 sections 8.1.2 and 17.2.5): how the controller makes a client
prove it receives packets at the address it claims before it spends any state on it.

A Retry packet carries a token; the client repeats its Initial with that token, to the
connection ID the Retry named. The token is everything the controller needs to take that
second Initial up, so between the two nothing is kept: the token is sealed (AES-256-GCM) under
a key drawn at random when the process starts and never written anywhere, and holds

- the original destination connection ID (the client's first choice: aioquic must echo it in
  the transport parameters, and the client checks it),
- the retry source connection ID (the one the Retry packet named: the client's second Initial
  must be addressed to it, and the transport parameters echo it too),
- the time it was issued (valid for ``lifetime`` seconds, 10 by default: a Retry is answered
  within a round trip or two),

and is bound to the client's address (IP and port) as associated data, so a token is worth
nothing from any other address: a spoofed source never sees its token, and one taken from a
real client cannot be replayed from elsewhere. A tampered, expired, foreign-address or garbage
token fails to open: ``InvalidToken`` (the endpoint drops the packet and counts it).

The key lives as long as the process: a token issued before a restart is refused, which costs
the client one handshake timeout; Retry tokens are short-lived by design, so nothing is lost by
not keeping the key.

Sans-IO: the time is passed in (the event loop's clock), nothing here touches a socket.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass
from typing import Any

from aioquic.quic.packet import encode_quic_retry
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from margo_stream.errors import MargoError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
DEFAULT_LIFETIME = 10.0
MAX_CID = 20  # RFC 9000 17.2: connection IDs are at most 20 bytes
_ISSUED = struct.Struct("!d")  # issue time, the clock the caller passes in
MAX_TOKEN = NONCE_SIZE + _ISSUED.size + 2 + 2 * MAX_CID + TAG_SIZE


class InvalidToken(MargoError):
    """A Retry token this process did not issue for this address, or one that has expired."""


@dataclass(frozen=True, slots=True)
class Validated:
    """What a valid token vouches for: the connection IDs the server connection must echo."""

    original_destination_cid: bytes
    retry_source_cid: bytes


def address_bytes(addr: Any) -> bytes:
    """The client's address as the token binds it: packed IP and port. IPv4 and IPv4-mapped
    IPv6 give the same bytes (one client, whichever socket family received it)."""
    host, port = addr[0], addr[1]
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.packed + struct.pack("!H", port)


class RetryTokens:
    """Issues and opens Retry tokens under a key of this process's own."""

    def __init__(self, *, lifetime: float = DEFAULT_LIFETIME, key: bytes | None = None) -> None:
        if lifetime <= 0:
            raise ValueError("retry token lifetime must be > 0 seconds")
        key = os.urandom(KEY_SIZE) if key is None else key
        if len(key) != KEY_SIZE:
            raise ValueError(f"retry token key must be {KEY_SIZE} bytes")
        self.lifetime = lifetime
        self._aead = AESGCM(key)

    def issue(
        self, addr: Any, original_destination_cid: bytes, retry_source_cid: bytes, now: float
    ) -> bytes:
        """A token for ``addr`` naming both connection IDs, issued at ``now``."""
        if len(original_destination_cid) > MAX_CID or len(retry_source_cid) > MAX_CID:
            raise ValueError(f"connection IDs are at most {MAX_CID} bytes")
        plain = b"".join(
            (
                _ISSUED.pack(now),
                bytes([len(original_destination_cid)]),
                original_destination_cid,
                bytes([len(retry_source_cid)]),
                retry_source_cid,
            )
        )
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plain, address_bytes(addr))

    def validate(self, addr: Any, token: bytes, now: float) -> Validated:
        """The connection IDs ``token`` vouches for, if this process issued it to ``addr`` less
        than ``lifetime`` seconds before ``now``; ``InvalidToken`` otherwise."""
        if not NONCE_SIZE + _ISSUED.size + 2 + TAG_SIZE <= len(token) <= MAX_TOKEN:
            raise InvalidToken(f"retry token of {len(token)} bytes is not one of ours")
        try:
            bound = address_bytes(addr)
        except (ValueError, TypeError, IndexError, struct.error):
            raise InvalidToken(f"retry token from an address we cannot read: {addr!r}") from None
        try:
            plain = self._aead.decrypt(token[:NONCE_SIZE], token[NONCE_SIZE:], bound)
        except InvalidTag:
            raise InvalidToken(
                "retry token does not open: not issued by this process, altered, or issued "
                "to another address"
            ) from None
        (issued,) = _ISSUED.unpack_from(plain)
        age = now - issued
        if not 0 <= age <= self.lifetime:
            raise InvalidToken(f"retry token is {age:.1f}s old (valid {self.lifetime:g}s)")
        at = _ISSUED.size
        odcid = plain[at + 1 : at + 1 + plain[at]]
        at += 1 + plain[at]
        scid = plain[at + 1 : at + 1 + plain[at]]
        return Validated(original_destination_cid=odcid, retry_source_cid=scid)

    def retry_packet(
        self,
        addr: Any,
        *,
        version: int,
        client_cid: bytes,
        original_destination_cid: bytes,
        now: float,
        cid_length: int = 8,
    ) -> bytes:
        """The Retry packet answering a client's Initial (sent by ``addr`` from connection ID
        ``client_cid`` to ``original_destination_cid``): a fresh connection ID for the
        client's second Initial and the token naming both. About 100 bytes, less than the
        1,200-byte Initial it answers: no amplification."""
        retry_source_cid = os.urandom(cid_length)
        return encode_quic_retry(
            version=version,
            source_cid=retry_source_cid,
            destination_cid=client_cid,
            original_destination_cid=original_destination_cid,
            retry_token=self.issue(addr, original_destination_cid, retry_source_cid, now),
        )


__all__ = ["DEFAULT_LIFETIME", "InvalidToken", "RetryTokens", "Validated", "address_bytes"]
