"""The allow-list's offline channel: ``DIR/<tenant>/allowed/<device-id>.json``.

``margo-certs device`` writes one file per device it issues (no controller is needed for
that); the controller imports them into its store at start, on SIGHUP and on
``POST /api/v1/admin/reload``, and reads one device's file when a handshake of that device
would otherwise be refused (so a device issued while the controller runs connects at once).

A file is ``{"device": id, "key_sha256": hex, "not_after": unix seconds, "issued": unix
seconds}``: the SHA-256 of the DER SubjectPublicKeyInfo of the certificate's key, the
certificate's expiry, and when it was issued. ``issued`` orders a file against what the
controller's store recorded since (an enrolment with a new key, a revocation): a file older
than the stored record changes nothing (see ``controller/allowlist.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from margo_stream.errors import IdentityError
from margo_stream.fsutil import atomic_write
from margo_stream.identity.spiffe import validate_device_id

ALLOWED_DIR = "allowed"
MAX_FILE_BYTES = 4096
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class AllowedFile:
    tenant: str
    device_id: str
    key_sha256: str
    not_after: float
    issued: float | None  # None in a file without it: then only a new key counts as newer


def spki_sha256(key: PublicKeyTypes | x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo of a key (or a certificate's)."""
    public = key.public_key() if isinstance(key, x509.Certificate) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def allowed_path(certs_dir: Path, tenant: str, device_id: str) -> Path:
    return Path(certs_dir) / tenant / ALLOWED_DIR / f"{device_id}.json"


def allowed_document(device_id: str, cert: x509.Certificate, *, now: float | None = None) -> bytes:
    """The allow file's bytes for ``cert`` issued to ``device_id`` (at ``now``)."""
    body = {
        "device": validate_device_id(device_id),
        "key_sha256": spki_sha256(cert),
        "not_after": int(cert.not_valid_after_utc.timestamp()),
        "issued": time.time() if now is None else now,
    }
    return (json.dumps(body, sort_keys=True) + "\n").encode()


def write_allowed(
    certs_dir: Path,
    tenant: str,
    device_id: str,
    cert: x509.Certificate,
    *,
    now: float | None = None,
) -> Path:
    """Record that ``cert`` (just issued to ``device_id``) is allowed; returns the file."""
    path = allowed_path(certs_dir, tenant, device_id)
    document = allowed_document(device_id, cert, now=now)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write(path, document, mode=0o644)
    return path


def read_allowed(path: Path, tenant: str) -> AllowedFile:
    """One file, checked; ``IdentityError`` naming the file and what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise IdentityError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        body: Any = json.loads(data)
    except ValueError:
        raise IdentityError(f"{path}: not JSON") from None
    if not isinstance(body, dict):
        raise IdentityError(f"{path}: not a JSON object")
    device = body.get("device")
    if not isinstance(device, str) or device + ".json" != path.name:
        raise IdentityError(f"{path}: 'device' must be the file's name without .json")
    try:
        validate_device_id(device)
    except IdentityError as exc:
        raise IdentityError(f"{path}: {exc}") from None
    key = body.get("key_sha256")
    if not isinstance(key, str) or not _HEX64.fullmatch(key):
        raise IdentityError(f"{path}: 'key_sha256' must be 64 lowercase hex digits")
    not_after = body.get("not_after")
    issued = body.get("issued")
    if not isinstance(not_after, int | float) or not _is_number(not_after):
        raise IdentityError(f"{path}: 'not_after' must be unix seconds")
    if issued is not None and not _is_number(issued):
        raise IdentityError(f"{path}: 'issued' must be unix seconds")
    return AllowedFile(
        tenant, device, key, float(not_after), None if issued is None else float(issued)
    )


def read_allowed_dir(certs_dir: Path, tenants: list[str]) -> list[AllowedFile]:
    """Every tenant's files; the first bad file raises ``IdentityError`` (nothing is used)."""
    found: list[AllowedFile] = []
    for tenant in tenants:
        folder = Path(certs_dir) / tenant / ALLOWED_DIR
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            found.append(read_allowed(path, tenant))
    return found


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


__all__ = [
    "ALLOWED_DIR",
    "AllowedFile",
    "allowed_document",
    "allowed_path",
    "read_allowed",
    "read_allowed_dir",
    "spki_sha256",
    "write_allowed",
]
