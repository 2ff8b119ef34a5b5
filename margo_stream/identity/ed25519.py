"""Ed25519 signature checks, done by libsodium (PyNaCl).

Every push a device takes costs it two Ed25519 checks (the controller's signature over the
manifest, the operator's over a changed deployment), and every apply costs the controller
one per document. libsodium checks a signature in about half of OpenSSL's time on the bench
machine (65 against 119 us, `bench/RESULTS.md`), and it is the stricter of the two (it also
refuses small-order keys and signature points), so no signature OpenSSL refuses passes here.

Keys stay ``cryptography`` objects everywhere else (loading, signing, serialising); only the
check is routed here, by the key's raw 32 bytes.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

SIGNATURE_SIZE = 64


def signature_ok(key: Ed25519PublicKey, signature: bytes | bytearray, data: bytes) -> bool:
    """Whether ``signature`` (64 bytes) is ``key``'s Ed25519 signature over ``data``."""
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        crypto_sign_open(bytes(signature) + data, key.public_bytes_raw())
    except BadSignatureError:
        return False
    return True


__all__ = ["SIGNATURE_SIZE", "signature_ok"]
