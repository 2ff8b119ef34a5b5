"""Signed envelopes: the one shape every authority document takes (TUF's).

An envelope is ``{"signed": {...}, "signatures": [{"keyid": ..., "sig": ...}]}``. Each
signature is Ed25519 over the canonical JSON bytes of ``signed`` (sorted keys, no spaces,
UTF-8); ``keyid`` is the lowercase hex SHA-256 of the signer's raw 32-byte public key, so a key
is named by what it is, not by what a document calls it. ``signed["_type"]`` says what the
document is, so a signature on one kind of document never passes as another.

Verification counts distinct keys of the allowed set whose signature checks out and requires
a threshold of them; unknown key ids and bad signatures are skipped (another party may add
signatures), duplicates count once. Size and depth are bounded before anything is parsed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from margo_stream.errors import AuthorityError
from margo_stream.identity.ed25519 import signature_ok
from margo_stream.protocol.codes import Refusal

MAX_ENVELOPE_BYTES = 64 * 1024
MAX_SIGNATURES = 16


def canonical(value: Any) -> bytes:
    """The bytes every signature covers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public(key)).hexdigest()


def public_key_doc(key: Ed25519PublicKey) -> dict[str, str]:
    return {"keytype": "ed25519", "public": base64.b64encode(raw_public(key)).decode()}


def public_key_of(doc: object, what: str) -> Ed25519PublicKey:
    """The Ed25519 key a ``{"keytype": "ed25519", "public": base64}`` document names."""
    if not isinstance(doc, Mapping) or doc.get("keytype") != "ed25519":
        raise AuthorityError(f"{what}: not an ed25519 key document", Refusal.MALFORMED)
    try:
        raw = base64.b64decode(str(doc.get("public", "")), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise AuthorityError(
            f"{what}: not a 32-byte base64 ed25519 key", Refusal.MALFORMED
        ) from None


def sign(signed: Mapping[str, Any], keys: Iterable[Ed25519PrivateKey]) -> dict[str, Any]:
    """An envelope of ``signed`` with a signature by each of ``keys``."""
    data = canonical(signed)
    return {
        "signed": dict(signed),
        "signatures": [
            {"keyid": key_id(k.public_key()), "sig": base64.b64encode(k.sign(data)).decode()}
            for k in keys
        ],
    }


def parse(data: bytes | str | Mapping[str, Any], kind: str, what: str) -> dict[str, Any]:
    """The envelope in ``data`` (bytes, text or an already decoded object), checked for shape
    and for ``signed["_type"] == kind``; nothing is verified yet."""
    if isinstance(data, bytes | str):
        if len(data) > MAX_ENVELOPE_BYTES:
            raise AuthorityError(
                f"{what}: {len(data)} bytes, more than {MAX_ENVELOPE_BYTES}", Refusal.MALFORMED
            )
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            raise AuthorityError(f"{what}: not JSON", Refusal.MALFORMED) from None
    else:
        value = dict(data)
    if not isinstance(value, dict) or not isinstance(value.get("signed"), dict):
        raise AuthorityError(f"{what}: not a signed envelope", Refusal.MALFORMED)
    sigs = value.get("signatures")
    if not isinstance(sigs, list) or len(sigs) > MAX_SIGNATURES:
        raise AuthorityError(
            f"{what}: 'signatures' must be a list of at most {MAX_SIGNATURES}", Refusal.MALFORMED
        )
    if value["signed"].get("_type") != kind:
        raise AuthorityError(
            f"{what}: a {str(value['signed'].get('_type'))[:40]!r} document, not {kind!r}",
            Refusal.MALFORMED,
        )
    return value


def signers(
    envelope: Mapping[str, Any],
    keys: Mapping[str, Ed25519PublicKey],
    memo: SignatureMemo | None = None,
) -> set[str]:
    """The ids of the keys of ``keys`` (key id -> key) whose signature over the envelope's
    ``signed`` checks out (each counted once; unknown ids and bad signatures are skipped);
    with ``memo``, outcomes it remembers are not checked again."""
    check = signature_ok if memo is None else memo.check
    data = canonical(envelope["signed"])
    good: set[str] = set()
    for entry in envelope["signatures"]:
        if not isinstance(entry, dict):
            continue
        kid, sig = entry.get("keyid"), entry.get("sig")
        if not isinstance(kid, str) or not isinstance(sig, str) or kid in good:
            continue
        key = keys.get(kid)
        if key is None:
            continue
        try:
            raw = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError):
            continue
        if check(key, raw, data):
            good.add(kid)
    return good


CHECKED_MAX = 4096  # (key, signature, message digest) outcomes a memo remembers


class SignatureMemo:
    """Outcomes of Ed25519 checks remembered by the key, the signature and the SHA-256 of the
    data, for one party that sees the same signature again and again: the controller checks
    the operator's certificate with every apply (an Ed25519 check is about 70 us; the lookup
    is a hash). Bounded (cleared when full). A device keeps none: it checks each push's
    signatures itself, so 500 simulated devices in one process cost what 500 devices do."""

    __slots__ = ("_outcomes",)

    def __init__(self) -> None:
        self._outcomes: dict[tuple[bytes, bytes, bytes], bool] = {}

    def check(self, key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
        memo_key = (key.public_bytes_raw(), signature, hashlib.sha256(data).digest())
        known = self._outcomes.get(memo_key)
        if known is not None:
            return known
        valid = signature_ok(key, signature, data)
        if len(self._outcomes) >= CHECKED_MAX:
            self._outcomes.clear()
        self._outcomes[memo_key] = valid
        return valid

    def __len__(self) -> int:
        return len(self._outcomes)


def verify(
    envelope: Mapping[str, Any],
    keys: Mapping[str, Ed25519PublicKey],
    threshold: int,
    what: str,
    memo: SignatureMemo | None = None,
) -> dict[str, Any]:
    """``envelope["signed"]`` once at least ``threshold`` of ``keys`` (key id -> key) signed
    it; ``AuthorityError(bad-signature)`` otherwise."""
    good = signers(envelope, keys, memo)
    if threshold < 1 or len(good) < threshold:
        raise AuthorityError(
            f"{what}: {len(good)} valid signature(s) by the keys it must be signed by, "
            f"{threshold} required",
            Refusal.BAD_SIGNATURE,
        )
    return dict(envelope["signed"])
