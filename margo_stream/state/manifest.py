"""The signed per-device desired state: margo-stream's superset of Margo's state manifest.

Wire form (JSON; signed over the exact canonical bytes, detached Ed25519)::

    {"mediaType": "application/vnd.margo-stream.desired-state.v1+json",
     "manifestVersion": 7, "tenant": "plant-a.example", "deviceId": "edge-07",
     "issuedAt": "2025-01-01T00:00:00Z", "expires": "2025-01-08T00:00:00Z",
     "bundle": null,
     "deployments": [{"deploymentId": "...", "digest": "sha256:...",
                      "url": "/api/v1/deployments/<id>/<digest>",
                      "files": [{"name": "config/app.toml", "digest": "sha256:..."}]}]}

Margo rc.3's ``UnsignedAppStateManifest`` is the projection ``margo_manifest()``: version,
bundle and ``{deploymentId, digest, url}`` per deployment. What we add is what TUF needs for an
agent to trust a manifest no matter who relayed it: the tenant and device it is for (no
mix-and-match between devices), an issue time and an expiry (no freeze), and the digests of
the extra files. ``bundle`` is always null: blobs travel individually on the desired-state
stream and only the ones the device lacks are sent, so there is no archive to reference.

Canonical bytes: ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
encoded as UTF-8; deployments sorted by id, files by name, times in whole seconds UTC.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from margo_stream.errors import DocumentError
from margo_stream.identity.ed25519 import signature_ok
from margo_stream.state.content_rules import ID_RULE, valid_id, validate_file_name
from margo_stream.state.digest import is_digest
from margo_stream.state.documents import FileRef, format_path

MEDIA_TYPE = "application/vnd.margo-stream.desired-state.v1+json"
MARGO_MEDIA_TYPE = "application/vnd.margo.manifest.v1+json"
MAX_VERSION = 2**64 - 1
MAX_MANIFEST_BYTES = 4 << 20

_TENANT_RE = re.compile(r"[a-z0-9._-]{1,255}")  # a SPIFFE trust domain name
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*")  # Margo DeviceId
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")


def canonical_json(value: Any) -> bytes:
    """The canonical encoding every signed byte string uses."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def deployment_url(deployment_id: str, digest: str) -> str:
    """Margo's content-addressed location of one ApplicationDeployment document."""
    return f"/api/v1/deployments/{deployment_id}/{digest}"


def format_time(value: dt.datetime) -> str:
    """RFC 3339 UTC with a ``Z`` and whole seconds (sub-second parts are dropped)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise DocumentError(f"time {value!r} has no time zone; pass an aware datetime (UTC)")
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str, field: str) -> dt.datetime:
    if not _TIME_RE.fullmatch(value):
        raise DocumentError(
            f"manifest {field}: {value[:40]!r} is not RFC 3339 UTC like 2025-01-01T00:00:00Z"
        )
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise DocumentError(f"manifest {field}: {value!r}: {exc}") from None


# --------------------------------------------------------------------------- models


class ManifestEntry(BaseModel):
    """One deployment of a manifest: its document digest and its extra files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deployment_id: str
    digest: str
    files: tuple[FileRef, ...] = ()
    # the deploying operator's signature envelope over (tenant, id, digest, signedAt), and the
    # digest of that operator's certificate (a blob, pushed like the files)
    signature: dict[str, Any] | None = None
    certificate: str | None = None

    @property
    def url(self) -> str:
        return deployment_url(self.deployment_id, self.digest)

    def check(self) -> ManifestEntry:
        """Validate ids, digests and file names; return the entry with files sorted by name."""
        if not valid_id(self.deployment_id):
            raise DocumentError(f"deployment id {self.deployment_id[:60]!r} must match {ID_RULE}")
        if not is_digest(self.digest):
            raise DocumentError(
                f"deployment {self.deployment_id!r}: invalid digest {self.digest[:80]!r}"
            )
        if self.certificate is not None and not is_digest(self.certificate):
            raise DocumentError(
                f"deployment {self.deployment_id!r}: invalid certificate digest {self.certificate[:80]!r}"
            )
        if (self.signature is None) != (self.certificate is None):
            raise DocumentError(
                f"deployment {self.deployment_id!r}: a signature and a certificate go together"
            )
        names: set[str] = set()
        for f in self.files:
            try:
                validate_file_name(f.name)
            except ValueError as exc:
                raise DocumentError(f"deployment {self.deployment_id!r}: {exc}") from None
            if not is_digest(f.digest):
                raise DocumentError(
                    f"deployment {self.deployment_id!r} file {f.name!r}: invalid digest {f.digest[:80]!r}"
                )
            if f.name in names:
                raise DocumentError(
                    f"deployment {self.deployment_id!r}: duplicate file name {f.name!r}"
                )
            names.add(f.name)
        return self.model_copy(update={"files": tuple(sorted(self.files, key=lambda f: f.name))})

    def wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "deploymentId": self.deployment_id,
            "digest": self.digest,
            "url": self.url,
            "files": [{"name": f.name, "digest": f.digest} for f in self.files],
        }
        if self.signature is not None:
            wire["signature"] = self.signature
            wire["certificate"] = self.certificate
        return wire


class Manifest(BaseModel):
    """A parsed, validated desired-state manifest (its signature is checked elsewhere)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    media_type: str = MEDIA_TYPE
    manifest_version: int
    tenant: str
    device_id: str
    issued_at: dt.datetime
    expires: dt.datetime
    bundle: None = None
    deployments: tuple[ManifestEntry, ...] = ()

    def entry(self, deployment_id: str) -> ManifestEntry | None:
        for e in self.deployments:
            if e.deployment_id == deployment_id:
                return e
        return None


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _WireFile(_Wire):
    name: str
    digest: str


class _WireDeployment(_Wire):
    deploymentId: str
    digest: str
    url: str
    files: list[_WireFile]
    signature: dict[str, Any] | None = None
    certificate: str | None = None


class _WireManifest(_Wire):
    mediaType: str
    manifestVersion: int
    tenant: str
    deviceId: str
    issuedAt: str
    expires: str
    bundle: None
    deployments: list[_WireDeployment]


# --------------------------------------------------------------------------- build / parse


def _check_header(version: int, tenant: str, device_id: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise DocumentError(f"manifestVersion {version!r} must be an integer in [1, 2^64-1]")
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise DocumentError(
            f"tenant {str(tenant)[:60]!r} must be a trust domain name ([a-z0-9._-]{{1,255}})"
        )
    if (
        not isinstance(device_id, str)
        or not _DEVICE_ID_RE.fullmatch(device_id)
        or len(device_id) > 255
    ):
        raise DocumentError(f"deviceId {str(device_id)[:60]!r} is not a Margo DeviceId")


def _check_entries(
    entries: Iterable[ManifestEntry], *, require_sorted: bool
) -> tuple[ManifestEntry, ...]:
    checked = [e.check() for e in entries]
    ids = [e.deployment_id for e in checked]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DocumentError(f"deployment {dup!r} appears twice in one manifest")
    if require_sorted and ids != sorted(ids):
        raise DocumentError("manifest deployments are not sorted by deploymentId")
    return tuple(sorted(checked, key=lambda e: e.deployment_id))


def build_manifest(
    tenant: str,
    device_id: str,
    version: int,
    deployments: list[ManifestEntry],
    *,
    issued_at: dt.datetime,
    expires: dt.datetime,
) -> bytes:
    """The canonical bytes of a manifest; raises ``DocumentError`` on any invalid input."""
    return build_typed_manifest(
        tenant, device_id, version, deployments, issued_at=issued_at, expires=expires
    )[1]


def build_typed_manifest(
    tenant: str,
    device_id: str,
    version: int,
    deployments: list[ManifestEntry],
    *,
    issued_at: dt.datetime,
    expires: dt.datetime,
) -> tuple[Manifest, bytes]:
    """``build_manifest`` that also returns the typed manifest its bytes parse back to, so a
    builder never parses what it has just built."""
    _check_header(version, tenant, device_id)
    entries = _check_entries(deployments, require_sorted=False)
    issued, expiry = format_time(issued_at), format_time(expires)
    if expiry <= issued:
        raise DocumentError(f"expires {expiry} must be after issuedAt {issued}")
    data = canonical_json(
        {
            "mediaType": MEDIA_TYPE,
            "manifestVersion": version,
            "tenant": tenant,
            "deviceId": device_id,
            "issuedAt": issued,
            "expires": expiry,
            "bundle": None,
            "deployments": [e.wire() for e in entries],
        }
    )
    if len(data) > MAX_MANIFEST_BYTES:
        raise DocumentError(f"manifest is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    manifest = Manifest(
        manifest_version=version,
        tenant=tenant,
        device_id=device_id,
        issued_at=_parse_time(issued, "issuedAt"),
        expires=_parse_time(expiry, "expires"),
        deployments=entries,
    )
    return manifest, data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DocumentError(f"manifest has duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise DocumentError(f"manifest contains {name}, which is not JSON")


def parse_manifest(data: bytes) -> Manifest:
    """Strictly parse manifest bytes; ``DocumentError`` names the first problem."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise DocumentError(f"manifest is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        raw = json.loads(
            data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except UnicodeDecodeError as exc:
        raise DocumentError(f"manifest is not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DocumentError(
            f"manifest is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise DocumentError("manifest nests too deeply") from None
    try:
        wire = _WireManifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise DocumentError(f"manifest {format_path(err['loc'])}: {err['msg']}") from None
    if wire.mediaType != MEDIA_TYPE:
        raise DocumentError(f"manifest mediaType {wire.mediaType[:80]!r} is not {MEDIA_TYPE!r}")
    _check_header(wire.manifestVersion, wire.tenant, wire.deviceId)
    issued = _parse_time(wire.issuedAt, "issuedAt")
    expires = _parse_time(wire.expires, "expires")
    if expires <= issued:
        raise DocumentError(
            f"manifest expires {wire.expires} is not after issuedAt {wire.issuedAt}"
        )
    entries = []
    for i, d in enumerate(wire.deployments):
        entry = ManifestEntry(
            deployment_id=d.deploymentId,
            digest=d.digest,
            files=tuple(FileRef(name=f.name, digest=f.digest) for f in d.files),
            signature=d.signature,
            certificate=d.certificate,
        )
        checked = entry.check()
        if checked.files != entry.files:
            raise DocumentError(f"manifest deployments[{i}].files are not sorted by name")
        if d.url != checked.url:
            raise DocumentError(
                f"manifest deployments[{i}].url {d.url[:120]!r} is not {checked.url!r}"
            )
        entries.append(entry)
    return Manifest(
        manifest_version=wire.manifestVersion,
        tenant=wire.tenant,
        device_id=wire.deviceId,
        issued_at=issued,
        expires=expires,
        deployments=_check_entries(entries, require_sorted=True),
    )


# --------------------------------------------------------------------------- signatures, views


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """A detached Ed25519 signature (64 bytes) over the exact manifest bytes."""
    return key.sign(manifest_bytes)


def signature_valid(manifest_bytes: bytes, signature: bytes, key: Ed25519PublicKey) -> bool:
    return signature_ok(key, signature, manifest_bytes)


def margo_manifest(manifest: Manifest) -> dict[str, Any]:
    """Margo rc.3's state manifest view: ``{manifestVersion, bundle, deployments}``."""
    return {
        "manifestVersion": manifest.manifest_version,
        "bundle": None,
        "deployments": [
            {"deploymentId": e.deployment_id, "digest": e.digest, "url": e.url}
            for e in manifest.deployments
        ],
    }


def blob_digests(manifest: Manifest) -> set[str]:
    """Every content digest the manifest references: documents and extra files."""
    return set(blob_labels(manifest))


def blob_labels(manifest: Manifest) -> dict[str, str]:
    """digest -> a human label (``deployment <id>``, ``file <id>/<name>`` or ``operator
    certificate of <id>``) for messages."""
    labels: dict[str, str] = {}
    for e in manifest.deployments:
        labels.setdefault(e.digest, f"deployment {e.deployment_id}")
        for f in e.files:
            labels.setdefault(f.digest, f"file {e.deployment_id}/{f.name}")
        if e.certificate is not None:
            labels.setdefault(e.certificate, f"operator certificate of {e.deployment_id}")
    return labels
