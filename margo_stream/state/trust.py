"""Agent-side verification of signed desired state, following TUF's rules for a client.

Theory of operation. The agent pinned its tenant's signing key at enrolment. A desired-state
push (manifest bytes, detached signature, the blobs the agent lacked) is checked in TUF's
order, and the first failure refuses the whole push with a ``TrustError`` whose ``refusal`` says
why:

1. the pinned key is the one we were given               -> ``key-changed``
2. the signature over the exact bytes                     -> ``bad-signature``
3. the manifest parses strictly                           -> ``malformed``
4. it names our tenant and our device (no mix-and-match)  -> ``wrong-tenant``, ``wrong-device``
5. version: lower than held                               -> ``rollback``
            equal to held with other bytes                -> ``version-reuse``
6. not expired at ``now`` (no freeze attack)              -> ``expired``
7. equal version with the same bytes: a no-op verdict (``unchanged=True``), no blobs needed
8. every referenced blob is present                       -> ``missing-blob``
   and hashes to its digest                               -> ``digest-mismatch`` (names it)

``verify`` changes nothing on disk. The caller applies the verdict (stores blobs, reconciles)
and then calls ``accept``, which durably raises the held version. Two steps, so an apply that
is torn by a crash never advances trust: the same manifest is accepted again after restart.

Trust state (JSON, replaced with ``atomic_write``): format, tenant, deviceId, keyFingerprint,
manifestVersion and manifestDigest of the highest accepted manifest. It is created, pinning the
key, the first time a verifier is constructed for a state path; rotating the key means
re-enrolling (removing the file), never accepting a new key from the wire.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from margo_stream.errors import DocumentError, TrustError
from margo_stream.fsutil import atomic_write
from margo_stream.protocol.codes import Refusal
from margo_stream.state.digest import is_digest, sha256_digest
from margo_stream.state.manifest import Manifest, blob_labels, parse_manifest, signature_valid

STATE_FORMAT = 1

# Refusals (TrustError.refusal), by their short names.
BAD_SIGNATURE = Refusal.BAD_SIGNATURE
EXPIRED = Refusal.EXPIRED
ROLLBACK = Refusal.ROLLBACK
VERSION_REUSE = Refusal.VERSION_REUSE
WRONG_DEVICE = Refusal.WRONG_DEVICE
WRONG_TENANT = Refusal.WRONG_TENANT
DIGEST_MISMATCH = Refusal.DIGEST_MISMATCH
MISSING_BLOB = Refusal.MISSING_BLOB
MALFORMED = Refusal.MALFORMED
KEY_CHANGED = Refusal.KEY_CHANGED
STATE_CORRUPT = Refusal.STATE_CORRUPT


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """``sha256:<hex>`` of the raw 32-byte public key."""
    return sha256_digest(key.public_bytes(Encoding.Raw, PublicFormat.Raw))


@dataclass(frozen=True, slots=True)
class Verdict:
    """A push that passed every check; apply it, then pass it to ``accept``."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    manifest_digest: str
    unchanged: bool  # same version and bytes as held: nothing to apply
    previous_version: int | None
    key_fingerprint: str

    @property
    def version(self) -> int:
        return self.manifest.manifest_version


@dataclass(frozen=True, slots=True)
class TrustState:
    tenant: str
    device_id: str
    key_fingerprint: str
    manifest_version: int | None = None
    manifest_digest: str | None = None

    def to_json(self) -> bytes:
        return (
            json.dumps(
                {
                    "format": STATE_FORMAT,
                    "tenant": self.tenant,
                    "deviceId": self.device_id,
                    "keyFingerprint": self.key_fingerprint,
                    "manifestVersion": self.manifest_version,
                    "manifestDigest": self.manifest_digest,
                },
                sort_keys=True,
                indent=1,
            ).encode()
            + b"\n"
        )

    @classmethod
    def from_json(cls, data: bytes, path: Path) -> TrustState:
        def corrupt(why: str) -> TrustError:
            return TrustError(
                f"trust state {path} is unreadable ({why}); re-enrol the device", STATE_CORRUPT
            )

        try:
            raw: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise corrupt(f"not JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise corrupt("unknown format")
        version, digest = raw.get("manifestVersion"), raw.get("manifestDigest")
        if not all(isinstance(raw.get(k), str) for k in ("tenant", "deviceId", "keyFingerprint")):
            raise corrupt("tenant, deviceId and keyFingerprint must be strings")
        if (version is None) != (digest is None):
            raise corrupt("manifestVersion and manifestDigest must both be set or both null")
        if version is not None and (
            isinstance(version, bool)
            or not isinstance(version, int)
            or version < 1
            or not is_digest(digest)
        ):
            raise corrupt("bad manifestVersion or manifestDigest")
        return cls(raw["tenant"], raw["deviceId"], raw["keyFingerprint"], version, digest)


class DesiredStateVerifier:
    """Decides whether a signed desired-state push may be applied, and remembers what was."""

    def __init__(
        self, tenant: str, device_id: str, public_key: Ed25519PublicKey, state_path: Path
    ) -> None:
        self.tenant = tenant
        self.device_id = device_id
        self.public_key = public_key
        self.fingerprint = key_fingerprint(public_key)
        self.state_path = Path(state_path)
        if self.state_path.exists():
            state = TrustState.from_json(self.state_path.read_bytes(), self.state_path)
            if state.tenant != tenant:
                raise TrustError(
                    f"trust state {self.state_path} belongs to tenant {state.tenant!r}, not {tenant!r}",
                    WRONG_TENANT,
                )
            if state.device_id != device_id:
                raise TrustError(
                    f"trust state {self.state_path} belongs to device {state.device_id!r}, not {device_id!r}",
                    WRONG_DEVICE,
                )
        else:
            state = TrustState(tenant, device_id, self.fingerprint)
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.state_path, state.to_json(), mode=0o600)
        self._state = state

    # ------------------------------------------------------------------ held state

    @property
    def held_version(self) -> int | None:
        return self._state.manifest_version

    @property
    def held_digest(self) -> str | None:
        return self._state.manifest_digest

    @property
    def pinned_fingerprint(self) -> str:
        return self._state.key_fingerprint

    # ------------------------------------------------------------------ checks

    def _check_key(self) -> None:
        if self._state.key_fingerprint != self.fingerprint:
            raise TrustError(
                f"signing key {self.fingerprint} is not the pinned key {self._state.key_fingerprint}; "
                "a new tenant key needs re-enrolment",
                KEY_CHANGED,
            )

    def verify(
        self,
        manifest_bytes: bytes,
        signature: bytes,
        blobs: Mapping[str, bytes],
        now: dt.datetime,
    ) -> Verdict:
        """Check a push; returns a ``Verdict`` or raises ``TrustError`` (nothing is persisted)."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be an aware datetime")
        self._check_key()
        if not signature_valid(manifest_bytes, signature, self.public_key):
            raise TrustError(
                "desired-state signature does not verify with the pinned tenant key", BAD_SIGNATURE
            )
        try:
            manifest = parse_manifest(manifest_bytes)
        except DocumentError as exc:
            raise TrustError(f"signed manifest is malformed: {exc}", MALFORMED) from None
        if manifest.tenant != self.tenant:
            raise TrustError(
                f"manifest is for tenant {manifest.tenant!r}, not {self.tenant!r}", WRONG_TENANT
            )
        if manifest.device_id != self.device_id:
            raise TrustError(
                f"manifest is for device {manifest.device_id!r}, not {self.device_id!r}",
                WRONG_DEVICE,
            )

        digest = sha256_digest(manifest_bytes)
        held = self._state.manifest_version
        version = manifest.manifest_version
        if held is not None and version < held:
            raise TrustError(
                f"manifest version {version} is lower than the held version {held}", ROLLBACK
            )
        if held is not None and version == held and digest != self._state.manifest_digest:
            raise TrustError(
                f"manifest version {version} was already accepted with other content "
                f"({self._state.manifest_digest}, now {digest})",
                VERSION_REUSE,
            )
        if now >= manifest.expires:
            raise TrustError(
                f"manifest version {version} expired at {manifest.expires.isoformat()} "
                f"(now {now.astimezone(dt.UTC).isoformat()})",
                EXPIRED,
            )
        unchanged = held is not None and version == held
        if not unchanged:
            self._check_blobs(manifest, blobs)
        return Verdict(
            manifest=manifest,
            manifest_bytes=bytes(manifest_bytes),
            signature=bytes(signature),
            manifest_digest=digest,
            unchanged=unchanged,
            previous_version=held,
            key_fingerprint=self.fingerprint,
        )

    @staticmethod
    def _check_blobs(manifest: Manifest, blobs: Mapping[str, bytes]) -> None:
        for digest, label in sorted(blob_labels(manifest).items(), key=lambda kv: kv[1]):
            if digest not in blobs:
                raise TrustError(
                    f"{label} ({digest}) was not received and is not held", MISSING_BLOB
                )
            actual = "sha256:" + hashlib.sha256(blobs[digest]).hexdigest()
            if actual != digest:
                raise TrustError(
                    f"{label}: content hashes to {actual}, manifest says {digest}", DIGEST_MISMATCH
                )

    # ------------------------------------------------------------------ commit

    def accept(self, verdict: Verdict) -> None:
        """Durably record ``verdict`` as applied; call only after the apply succeeded."""
        self._check_key()
        if (
            verdict.key_fingerprint != self.fingerprint
            or verdict.manifest.tenant != self.tenant
            or verdict.manifest.device_id != self.device_id
        ):
            raise TrustError("verdict was not issued by this verifier", KEY_CHANGED)
        held = self._state.manifest_version
        if held is not None and verdict.version < held:
            raise TrustError(
                f"version {verdict.version} is lower than the held version {held}", ROLLBACK
            )
        if held is not None and verdict.version == held:
            if verdict.manifest_digest != self._state.manifest_digest:
                raise TrustError(
                    f"version {held} already accepted with other content", VERSION_REUSE
                )
            return
        state = TrustState(
            self.tenant,
            self.device_id,
            self._state.key_fingerprint,
            verdict.version,
            verdict.manifest_digest,
        )
        atomic_write(self.state_path, state.to_json(), mode=0o600)
        self._state = state
