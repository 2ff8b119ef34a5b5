"""Agent-side verification of signed desired state, following TUF's rules for a client.

Theory of operation. The agent pinned its tenant's offline root key at enrolment. The root
metadata it trusts (checked against that key, then by TUF's chain rule; see
``margo_stream.identity.authority``) names the controller's online key, which signs manifests,
and certifies the operators, who sign the deployments. A desired-state push (root metadata
newer than the agent holds, manifest bytes, detached signature, the blobs the agent lacked) is
checked in this order, and the first failure refuses the whole push with a ``TrustError`` whose
``refusal`` says why:

1. the pinned root key is the one we were given           -> ``key-changed``
2. the root metadata chain from what we hold (or from the pinned key) to the newest
                                                           -> ``bad-signature``, ``root-rollback``,
                                                              ``expired``
3. the manifest signature by a ``controller`` key of that root -> ``bad-signature``
4. the manifest parses strictly                           -> ``malformed``
5. it names our tenant and our device (no mix-and-match)  -> ``wrong-tenant``, ``wrong-device``
6. version: lower than held                               -> ``rollback``
            equal to held with other bytes                -> ``version-reuse``
7. not expired at ``now`` (no freeze attack)              -> ``expired``
8. equal version with the same bytes: a no-op verdict (``unchanged=True``), no blobs needed
9. every referenced blob is present                       -> ``missing-blob``
   and hashes to its digest                               -> ``digest-mismatch`` (names it)
10. every new or changed deployment is signed by an operator the root certified with the
    ``deployer`` (or ``admin``) role, not expired, over this exact document
                                                           -> ``unsigned``, ``role-missing``,
                                                              ``bad-signature``, ``expired``
    and not older than the signature held for that deployment -> ``stale`` (a replay)

``verify`` changes nothing on disk. The caller applies the verdict (stores blobs, reconciles)
and then calls ``accept``, which durably records the manifest, the root metadata and the
deployments' signatures. Two steps, so an apply that is torn by a crash never advances trust.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from margo_stream.errors import AuthorityError, DocumentError, TrustError
from margo_stream.identity import envelope
from margo_stream.identity.authored import verify_signed_by
from margo_stream.identity.authority import (
    Operator,
    Role,
    RootMetadata,
    TrustedRoot,
    format_time,
    read_root,
    verify_operator,
)
from margo_stream.protocol.codes import Refusal
from margo_stream.slot_file import SlotFile, SlotFileError
from margo_stream.state.digest import sha256_digest
from margo_stream.state.manifest import (
    Manifest,
    ManifestEntry,
    blob_labels,
    parse_manifest,
    signature_valid,
)
from margo_stream.state.trust_state import HeldSignature, TrustState

MAX_CACHED_OPERATORS = 64

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
    root: RootMetadata | None = None  # the root metadata the push was checked against
    signed: Mapping[str, HeldSignature] = field(default_factory=dict)  # new or changed

    @property
    def version(self) -> int:
        return self.manifest.manifest_version


class DesiredStateVerifier:
    """Decides whether a signed desired-state push may be applied, and remembers what was."""

    def __init__(
        self, tenant: str, device_id: str, pinned_root: Ed25519PublicKey, state_path: Path
    ) -> None:
        self.tenant = tenant
        self.device_id = device_id
        self.pinned_root = pinned_root
        self.fingerprint = key_fingerprint(pinned_root)
        self.state_path = Path(state_path)
        self._file = SlotFile(self.state_path, mode=0o600)
        try:
            held = self._file.read()
        except SlotFileError as exc:
            raise TrustError(
                f"trust state {self.state_path} is unreadable ({exc}); re-enrol the device",
                Refusal.STATE_CORRUPT,
            ) from None
        if held is not None:
            state = TrustState.from_json(held, self.state_path, pinned=self.fingerprint)
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
            self._file.write(state.to_json())
        self._state = state
        self._root = read_root(state.root) if state.root is not None else None
        self._operators: dict[tuple[str, int], Operator] = {}

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

    @property
    def root(self) -> RootMetadata | None:
        """The newest root metadata accepted (with a manifest), if any."""
        return self._root

    @property
    def root_version(self) -> int | None:
        return self._root.version if self._root is not None else None

    def adopt_root(self, chain: Sequence[bytes], now: dt.datetime) -> RootMetadata:
        """Move the trusted root metadata along ``chain`` (as ``trusted_root``) and keep it:
        root metadata is checked and adopted on its own, before anything it vouches for."""
        self._check_key()
        trusted = self.trusted_root(chain, now).current
        if trusted is not self._root:
            state = TrustState(
                self.tenant,
                self.device_id,
                self._state.key_fingerprint,
                self._state.manifest_version,
                self._state.manifest_digest,
                trusted.envelope,
                self._state.signatures,
            )
            self._file.write(state.to_json())
            self._state = state
            self._root = trusted
        return trusted

    # ------------------------------------------------------------------ checks

    def _check_key(self) -> None:
        if self._state.key_fingerprint != self.fingerprint:
            raise TrustError(
                f"root key {self.fingerprint} is not the pinned key {self._state.key_fingerprint}; "
                "a new tenant root needs re-enrolment",
                KEY_CHANGED,
            )

    def trusted_root(self, chain: Sequence[bytes], now: dt.datetime) -> TrustedRoot:
        """The root metadata to check against: what is held, moved along ``chain`` (newer
        versions, oldest first); with nothing held, the chain from its first version the
        pinned key signed."""
        if self._root is not None:
            return TrustedRoot(self.tenant, self._root).update(list(chain), now)
        kid = envelope.key_id(self.pinned_root)
        for n, item in enumerate(chain):
            if kid in read_root(item).roles["root"].keyids:
                first = TrustedRoot.from_pinned(self.tenant, self.pinned_root, item, now)
                return first.update(list(chain[n + 1 :]), now)
        raise AuthorityError(
            "no root metadata signed by the pinned root key was offered; the controller must "
            "send the tenant's root metadata",
            BAD_SIGNATURE,
        )

    def verify(
        self,
        manifest_bytes: bytes,
        signature: bytes,
        blobs: Mapping[str, bytes],
        now: dt.datetime,
        root: Sequence[bytes] = (),
    ) -> Verdict:
        """Check a push; returns a ``Verdict`` or raises ``TrustError`` (nothing is persisted)."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be an aware datetime")
        self._check_key()
        trusted = self.trusted_root(root, now).current
        keys, _ = trusted.role_keys("controller")
        if not any(signature_valid(manifest_bytes, signature, k) for k in keys.values()):
            raise TrustError(
                "desired-state signature does not verify with a controller key the tenant's root "
                f"metadata (version {trusted.version}) names",
                BAD_SIGNATURE,
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
        signed: dict[str, HeldSignature] = {}
        if not unchanged:
            self._check_blobs(manifest, blobs)
            signed = self._check_authors(manifest, blobs, trusted, now)
        return Verdict(
            manifest=manifest,
            manifest_bytes=bytes(manifest_bytes),
            signature=bytes(signature),
            manifest_digest=digest,
            unchanged=unchanged,
            previous_version=held,
            key_fingerprint=self.fingerprint,
            root=trusted,
            signed=signed,
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

    def _check_authors(
        self, manifest: Manifest, blobs: Mapping[str, bytes], root: RootMetadata, now: dt.datetime
    ) -> dict[str, HeldSignature]:
        """Every deployment new or changed since the held signatures: signed by a deployer the
        root certified, and not older than the signature held for it."""
        out: dict[str, HeldSignature] = {}
        for entry in manifest.deployments:
            held = self._state.signatures.get(entry.deployment_id)
            if held is not None and held.digest == entry.digest:
                continue  # accepted before, with its signature checked then
            try:
                out[entry.deployment_id] = self._check_author(entry, held, blobs, root, now)
            except TrustError as exc:
                raise AuthorityError(
                    str(exc), exc.refusal, deployment_id=entry.deployment_id
                ) from None
        return out

    def _operator(
        self, cert_digest: str, cert: bytes, root: RootMetadata, now: dt.datetime
    ) -> Operator:
        """The deployer a certificate names, verified against ``root``; remembered per
        (certificate, root version), so a fan-out of one operator's changes costs one
        certificate check per device, not one per push (expiry is checked every time)."""
        key = (cert_digest, root.version)
        operator = self._operators.get(key)
        if operator is None:
            operator = verify_operator(cert, root, now, role=Role.DEPLOYER)
            if len(self._operators) >= MAX_CACHED_OPERATORS:
                self._operators.clear()
            self._operators[key] = operator
        elif now >= operator.expires:
            raise AuthorityError(
                f"operator {operator.name!r}'s certificate expired at "
                f"{format_time(operator.expires)}",
                Refusal.EXPIRED,
            )
        return operator

    def _check_author(
        self,
        entry: ManifestEntry,
        held: HeldSignature | None,
        blobs: Mapping[str, bytes],
        root: RootMetadata,
        now: dt.datetime,
    ) -> HeldSignature:
        if entry.signature is None or entry.certificate is None:
            raise AuthorityError(
                f"deployment {entry.deployment_id!r} is not signed by an operator",
                Refusal.UNSIGNED,
            )
        operator = self._operator(entry.certificate, blobs[entry.certificate], root, now)
        checked = verify_signed_by(
            entry.signature,
            operator,
            root.tenant,
            deployment_id=entry.deployment_id,
            digest=entry.digest,
            now=now,
        )
        if held is not None and checked.signed_at <= held.signed_at:
            raise AuthorityError(
                f"deployment {entry.deployment_id!r}: signed at "
                f"{format_time(checked.signed_at, precise=True)}, not newer than the held "
                f"version signed at {format_time(held.signed_at, precise=True)} (a replay)",
                Refusal.STALE,
            )
        return HeldSignature(entry.digest, checked.signed_at)

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
        root = verdict.root if verdict.root is not None else self._root
        if held is not None and verdict.version == held:
            if verdict.manifest_digest != self._state.manifest_digest:
                raise TrustError(
                    f"version {held} already accepted with other content", VERSION_REUSE
                )
            if root is self._root:
                return
        state = TrustState(
            self.tenant,
            self.device_id,
            self._state.key_fingerprint,
            verdict.version,
            verdict.manifest_digest,
            root.envelope if root is not None else None,
            {**self._state.signatures, **verdict.signed},
        )
        self._file.write(state.to_json())
        self._state = state
        self._root = root
