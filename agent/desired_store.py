"""The agent's durable copy of the desired state it applied: ``STATE/desired/``.

Layout::

    desired/
      blobs/<64 hex>    content-addressed documents and extra files, verified on every read
      current.json      {"format", "manifest" (b64), "signature" (b64), "manifestDigest"}

Crash safety: every file is written with ``atomic_write`` (write, fsync, rename, fsync dir).
``save_current`` refuses unless every blob the manifest references is already on disk, so a
``current.json`` never points at a blob that a crash could have lost; a failed write (disk
full) leaves the previous ``current.json`` as it was. ``gc`` never removes a blob the current
manifest references.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from margo_stream.errors import DocumentError, MargoError, TrustError
from margo_stream.fsutil import atomic_write
from margo_stream.protocol.codes import Refusal
from margo_stream.state.digest import digest_hex, sha256_digest, validate_digest
from margo_stream.state.manifest import blob_digests, parse_manifest

CURRENT_FORMAT = 1
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class DesiredStoreError(MargoError):
    """The agent's desired-state directory could not be read or written."""


class CorruptBlobError(DesiredStoreError):
    """A stored blob no longer matches its digest (disk corruption or tampering)."""

    def __init__(self, path: Path, digest: str, actual: str) -> None:
        super().__init__(
            f"stored blob {path} is corrupt: content hashes to {actual}, expected {digest}"
        )
        self.path = path
        self.digest = digest


class StoreFullError(DesiredStoreError):
    """The disk is full; nothing was replaced."""


class BlobMissing(DesiredStoreError, KeyError):
    """No blob with that digest is held."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DesiredStore:
    """Content-addressed blobs plus the signed manifest that was last applied."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "desired"
        self.blob_dir = self.root / "blobs"
        self.current_path = self.root / "current.json"
        self.blob_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ blobs

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / digest_hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def held_digests(self) -> set[str]:
        return {f"sha256:{p.name}" for p in self.blob_dir.iterdir() if _BLOB_NAME.fullmatch(p.name)}

    def put_blob(self, digest: str, data: bytes) -> None:
        """Store ``data`` under ``digest`` after checking that it hashes to it."""
        validate_digest(digest)
        actual = sha256_digest(data)
        if actual != digest:
            raise TrustError(
                f"blob content hashes to {actual}, not {digest}; not stored",
                Refusal.DIGEST_MISMATCH,
            )
        path = self.blob_path(digest)
        if path.is_file():
            try:
                if hashlib.sha256(path.read_bytes()).hexdigest() == path.name:
                    return
            except OSError:
                pass  # unreadable: rewrite it below
        self._write(path, data, f"blob {digest}")

    def get_blob(self, digest: str) -> bytes:
        """The blob's bytes; ``BlobMissing`` if absent, ``CorruptBlobError`` if it fails its digest."""
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobMissing(f"no stored blob {digest} ({path})") from None
        actual = sha256_digest(data)
        if actual != digest:
            raise CorruptBlobError(path, digest, actual)
        return data

    def blobs(self) -> Mapping[str, bytes]:
        """A read-only mapping view over held blobs (verified on access), e.g. for the verifier."""
        return _BlobView(self)

    def gc(self, keep: set[str]) -> set[str]:
        """Remove blobs outside ``keep`` and the current manifest; return the removed digests."""
        protect = set(keep)
        current = self.load_current()
        if current is not None:
            protect |= blob_digests(parse_manifest(current[0]))
        removed: set[str] = set()
        for path in self.blob_dir.iterdir():
            if _BLOB_NAME.fullmatch(path.name):
                digest = f"sha256:{path.name}"
                if digest not in protect:
                    path.unlink(missing_ok=True)
                    removed.add(digest)
            elif path.name.startswith("."):  # a temporary file left by a crash mid-write
                path.unlink(missing_ok=True)
        return removed

    # ------------------------------------------------------------------ current manifest

    def save_current(self, manifest_bytes: bytes, signature: bytes) -> None:
        """Atomically make this signed manifest the current one; all its blobs must be held."""
        try:
            manifest = parse_manifest(manifest_bytes)
        except DocumentError as exc:
            raise DesiredStoreError(f"refusing to store a malformed manifest: {exc}") from None
        missing = sorted(d for d in blob_digests(manifest) if not self.has_blob(d))
        if missing:
            raise DesiredStoreError(
                f"refusing to make manifest {manifest.manifest_version} current: "
                f"{len(missing)} blob(s) not stored yet, first {missing[0]}"
            )
        record = {
            "format": CURRENT_FORMAT,
            "manifest": base64.b64encode(manifest_bytes).decode(),
            "signature": base64.b64encode(signature).decode(),
            "manifestDigest": sha256_digest(manifest_bytes),
        }
        self._write(
            self.current_path, json.dumps(record, sort_keys=True).encode() + b"\n", "current.json"
        )

    def install(self, blobs: Mapping[str, bytes], manifest_bytes: bytes, signature: bytes) -> None:
        """Store ``blobs`` durably, then make the manifest current (the order crash safety needs)."""
        for digest, data in blobs.items():
            self.put_blob(digest, data)
        self.save_current(manifest_bytes, signature)

    def load_current(self) -> tuple[bytes, bytes] | None:
        """``(manifest_bytes, signature)`` of the current manifest, or None if there is none."""
        try:
            raw = self.current_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(raw)
            if record.get("format") != CURRENT_FORMAT:
                raise ValueError(f"unknown format {record.get('format')!r}")
            manifest = base64.b64decode(record["manifest"], validate=True)
            signature = base64.b64decode(record["signature"], validate=True)
            if sha256_digest(manifest) != record["manifestDigest"]:
                raise ValueError("manifestDigest does not match the stored manifest")
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise DesiredStoreError(f"{self.current_path} is corrupt: {exc}") from None
        return manifest, signature

    # ------------------------------------------------------------------ helpers

    def _write(self, path: Path, data: bytes, what: str) -> None:
        try:
            atomic_write(path, data, mode=0o600)
        except OSError as exc:
            if exc.errno in _FULL:
                raise StoreFullError(
                    f"disk full writing {what} to {path.parent} ({os.strerror(exc.errno)}); "
                    "the previous desired state is kept"
                ) from exc
            raise DesiredStoreError(f"cannot write {what} to {path}: {exc}") from exc


class _BlobView(Mapping[str, bytes]):
    def __init__(self, store: DesiredStore) -> None:
        self._store = store

    def __getitem__(self, digest: str) -> bytes:
        try:
            return self._store.get_blob(digest)
        except DocumentError:
            raise BlobMissing(f"invalid digest {digest!r}") from None

    def __contains__(self, digest: object) -> bool:
        try:
            return isinstance(digest, str) and self._store.has_blob(digest)
        except DocumentError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._store.held_digests()))

    def __len__(self) -> int:
        return len(self._store.held_digests())
