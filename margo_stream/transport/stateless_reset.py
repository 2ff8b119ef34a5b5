"""Stateless resets (RFC 9000 section 10.3): how a restarted controller tells agents at once
that their connection is gone, instead of leaving them to notice by unanswered keepalives.

Every connection ID the controller issues carries a reset token derived from the ID with a key
kept in its data directory (``HMAC-SHA256(key, cid)``, first 16 bytes), so after a restart it
can still name the token of a connection it no longer knows. A short-header packet for an
unknown connection ID is answered with a stateless reset: a datagram shaped like a short-header
packet, shorter than the packet that caused it (no amplification, no reset loops), ending in
that token. The agent compares the last 16 bytes of every datagram with the tokens the
controller gave it and, on a match, ends the connection and reconnects.

aioquic draws reset tokens at random and does not look for resets; the two places that reach
into it are in ``mtls_hook.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from margo_stream.errors import ConfigError
from margo_stream.fsutil import atomic_write

TOKEN_SIZE = 16
KEY_SIZE = 32
MIN_RESET = 21  # 1 header byte, at least 4 unpredictable bytes, the token
MAX_RESET = 43
KEY_FILE = "stateless-reset.key"


class ResetTokens:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"stateless reset key must be {KEY_SIZE} bytes")
        self._key = key

    def token(self, cid: bytes) -> bytes:
        return hmac.new(self._key, cid, hashlib.sha256).digest()[:TOKEN_SIZE]

    def reset_for(self, cid: bytes, received: int) -> bytes | None:
        """The stateless reset answering a ``received``-byte packet for ``cid``, or ``None``
        when that packet is too short to answer with a shorter one."""
        size = min(received - 1, MAX_RESET)
        if size < MIN_RESET:
            return None
        first = 0x40 | (os.urandom(1)[0] & 0x3F)  # short header, fixed bit set
        return bytes([first]) + os.urandom(size - 1 - TOKEN_SIZE) + self.token(cid)


def load_reset_key(data_dir: Path) -> bytes:
    """The controller's reset key, created (0600) on first start."""
    path = Path(data_dir) / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = os.urandom(KEY_SIZE)
        atomic_write(path, key, mode=0o600)
        return key
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(key) != KEY_SIZE:
        raise ConfigError(
            f"{path} holds {len(key)} bytes, not a {KEY_SIZE}-byte key; remove it "
            "and restart (agents connected now will then notice a restart by "
            "their keepalives instead)"
        )
    return key


def is_reset(data: bytes, tokens: list[bytes]) -> bool:
    """``data`` is a stateless reset carrying one of ``tokens`` (the peer's, for our
    connection): a short-header datagram long enough and ending in the token."""
    if len(data) < MIN_RESET or data[0] & 0x80 or not tokens:
        return False
    tail = data[-TOKEN_SIZE:]
    return any(hmac.compare_digest(tail, t) for t in tokens)


__all__ = ["KEY_FILE", "ResetTokens", "is_reset", "load_reset_key"]
