"""Content digests in Margo's form: ``sha256:<64 lowercase hex>`` over the exact bytes.

Margo's Desired State API (desired-state.md, "Protocol - Digest") allows no prefixes, suffixes,
whitespace or upper case, and only ``sha256``; a manifest naming anything else is invalid.
"""

from __future__ import annotations

import hashlib
import re

from margo_stream.errors import DocumentError

ALGORITHM = "sha256"
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def sha256_digest(data: bytes) -> str:
    """The Margo digest of ``data``: ``"sha256:"`` + 64 lowercase hex characters."""
    return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"


def is_digest(value: object) -> bool:
    """True when ``value`` is a well-formed digest string."""
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


def validate_digest(value: object) -> str:
    """Return ``value`` unchanged if it is a well-formed digest, else raise ``DocumentError``."""
    if is_digest(value):
        return value  # type: ignore[return-value]
    shown = repr(value) if not isinstance(value, str) else repr(value[:80])
    raise DocumentError(
        f"invalid digest {shown}: expected 'sha256:' followed by 64 lowercase hex characters"
    )


def digest_hex(value: str) -> str:
    """The 64-character hex part of a digest (validated), e.g. for a content-addressed file name."""
    return validate_digest(value).partition(":")[2]
