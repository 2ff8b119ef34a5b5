"""The controller's store: one small async interface, records as frozen dataclasses.

Theory of operation
-------------------
Everything the controller must remember across restarts lives behind ``Store``: the devices it
has seen, desired state (content-addressed blobs, deployments, per-device assignments and
signed manifests), the latest deployment status per device, telemetry records, terminal
session audits and an append-only event feed. The embedded implementation is SQLite
(``controller.store.sqlite.SqliteStore``); the interface is kept small so a PostgreSQL
implementation can replace it when a fleet outgrows one machine.

Rules every implementation keeps:

- **Tenant scoping.** Every query names its tenant; a device of another tenant is
  indistinguishable from a missing one (``NotFound`` with the same message).
- **Batches.** Where a method takes a list, the whole list is written in one transaction.
- **Dedup.** Telemetry is idempotent by ``(tenant, device, seq)``; a deployment status whose
  ``seq`` is not newer than the stored one is ignored. Retransmissions after a reconnect are
  therefore harmless.
- **Events.** Methods that change something an operator watches append to the event feed in
  the same transaction, so callers must not add these events themselves:
  ``device.connected``, ``device.disconnected``, ``device.labels``, ``deployment.applied``,
  ``deployment.assigned``,
  ``deployment.unassigned``, ``deployment.status`` (only when the state changes),
  ``manifest.created``, ``telemetry.gap``, ``terminal.opened``, ``terminal.closed``,
  ``device.allowed``, ``device.revoked``; a rollout's save appends the events its state
  machine produced (``rollout.*``, ``controller.store.rollouts``).
- **Errors.** Failures of the storage itself (disk full, corrupt file, locked database) raise
  ``StoreError`` naming the database; missing things raise ``NotFound``; invalid arguments
  raise ``ValueError``.

Times are unix seconds (float). Methods taking ``now`` use the current time when it is None.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from controller.store.claims import StatusRefusal
from controller.store.rollouts import RolloutStore

JsonDict = dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    tenant: str
    device_id: str
    capabilities: JsonDict  # Margo device-capabilities fields as reported in the hello
    labels: dict[str, str]  # assigned by operators; what selectors match (controller.labels)
    connected: bool  # as last recorded; the live answer comes from the SessionRegistry
    last_seen: float | None
    first_seen: float
    connection_count: int
    manifest_version: int | None  # the manifest version the device reports it adopted
    stats: JsonDict = field(default_factory=dict)  # e.g. telemetry buffer fill, dropped counts
    remote: str | None = None  # address of the last connection
    # what the device says of itself (hello, Margo capabilities); selectors read these only
    # when asked to (``reported.<key>``)
    reported_labels: dict[str, str] = field(default_factory=dict)


IDENTITY_ALLOWED = "allowed"
IDENTITY_REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """A device identity on the tenant's allow-list: admitted only with this key, until revoked.

    ``key_sha256`` is the lowercase hex SHA-256 of the DER SubjectPublicKeyInfo of the
    certificate's key; ``not_after`` (unix seconds) the expiry of the newest certificate issued
    or seen for it; ``updated`` when the record last changed."""

    tenant: str
    device_id: str
    key_sha256: str
    state: str  # IDENTITY_ALLOWED | IDENTITY_REVOKED
    not_after: float
    updated: float


# An allow file's facts: (tenant, device_id, key_sha256, not_after, issued or None).
IdentityImport = tuple[str, str, str, float, float | None]


def import_is_newer(item: IdentityImport, old: IdentityRecord | None) -> bool:
    """Whether an allow file says something newer than the record (``import_identities``)."""
    key, issued = item[2], item[4]
    if old is None:
        return True
    if issued is None:
        return key != old.key_sha256
    return issued > old.updated


def import_merged(item: IdentityImport, old: IdentityRecord | None, now: float) -> IdentityRecord:
    """What a newer allow file makes of the record: the same key keeps the state (a revoked
    identity stays revoked) and the later expiry; another key allows the identity again."""
    tenant, device_id, key, not_after, _ = item
    if old is not None and old.key_sha256 == key:
        return IdentityRecord(tenant, device_id, key, old.state, max(old.not_after, not_after), now)
    return IdentityRecord(tenant, device_id, key, IDENTITY_ALLOWED, not_after, now)


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    """One version of one deployment document; the document bytes are the blob ``digest``."""

    tenant: str
    deployment_id: str
    digest: str
    name: str
    profile: str
    created: float
    signature: str | None = None  # the deploying operator's signature envelope (JSON)
    certificate: str | None = None  # digest of the operator's certificate blob


@dataclass(frozen=True, slots=True)
class DeploymentDraft:
    """A deployment document an operator applies: its exact bytes and what was parsed of it."""

    deployment_id: str
    document: bytes
    name: str
    profile: str
    signature: str | None = None  # the operator's signature envelope, canonical JSON
    certificate: str | None = None  # digest of the operator's certificate (in the apply's blobs)


@dataclass(frozen=True, slots=True)
class AssignmentRecord:
    tenant: str
    device_id: str
    deployment_id: str
    digest: str
    assigned_at: float


class VersionConflict(ValueError):
    """A manifest version not above the device's latest: another writer (another controller
    of the cluster) stored that version first. Read the latest again and build the next."""


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    tenant: str
    device_id: str
    version: int
    manifest: bytes  # the exact signed bytes
    signature: bytes
    created: float


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """The latest deployment status a device reported (Margo's status document as a dict)."""

    tenant: str
    device_id: str
    deployment_id: str
    status: JsonDict
    seq: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    tenant: str
    device_id: str
    seq: int
    stream: str
    received_at: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class SessionAudit:
    """One operator terminal session to a device."""

    id: int
    tenant: str
    device_id: str
    operator: str
    command: str | None
    started_at: float
    ended_at: float | None
    bytes_in: int  # operator -> device
    bytes_out: int  # device -> operator
    reason: str | None  # why it ended
    exit_status: int | None = None  # the command's, when it exited (-N: killed by signal N)


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int  # strictly increasing across the whole store; use as a cursor
    tenant: str
    ts: float
    kind: str
    device_id: str | None
    payload: JsonDict


class TelemetryWriter(Protocol):
    """One device's telemetry, bound to it once its record was checked (a session's worth)."""

    async def watermark(self) -> int: ...

    async def ingest(self, records: Sequence[tuple[int, str, bytes]]) -> int:
        """``Store.ingest_telemetry`` for this device."""
        ...

    async def record_gap(self, first: int, last: int) -> int:
        """``Store.record_gap`` for this device."""
        ...


@runtime_checkable
class Store(RolloutStore, Protocol):
    """The controller's persistent state. All methods are coroutines; see the module doc."""

    path: str  # what to name in messages (a file for SQLite, a DSN without password otherwise)
    # How many hot-path write batches (``put_status_batch``) to run at once: 1 where writes
    # queue on one thread anyway (SQLite), more where a batch's round trip sets the rate.
    write_concurrency: int

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # -- devices -------------------------------------------------------------------------
    async def device_connected(
        self,
        tenant: str,
        device_id: str,
        *,
        capabilities: JsonDict,
        reported_labels: dict[str, str] | None,
        manifest_version: int | None,
        remote: str,
        now: float | None = None,
    ) -> DeviceRecord:
        """Insert or update; connection_count += 1, connected, last_seen = now.

        ``reported_labels`` (the device's own claim) replace the stored reported labels; None
        keeps them. The operator's ``labels`` are never touched here."""
        ...

    async def device_disconnected(
        self, tenant: str, device_id: str, now: float | None = None
    ) -> None: ...

    async def touch_devices(self, batch: Sequence[tuple[str, str, float]]) -> None:
        """``(tenant, device_id, ts)`` triples: last_seen = max(last_seen, ts). One transaction."""
        ...

    async def mark_all_disconnected(self) -> int:
        """At controller start: nobody is connected yet. Returns how many were marked."""
        ...

    async def list_devices(self, tenant: str) -> list[DeviceRecord]: ...

    async def get_device(self, tenant: str, device_id: str) -> DeviceRecord: ...

    async def set_labels(self, tenant: str, device_id: str, labels: dict[str, str]) -> None:
        """Replace the device's operator labels (``ValueError``, a ``LabelError``, for a bad
        one)."""
        ...

    async def update_labels(
        self, tenant: str, device_id: str, changes: dict[str, str | None]
    ) -> dict[str, str]:
        """Merge ``changes`` into the device's operator labels in one transaction (a value sets
        its key, None removes it); returns the resulting labels. ``LabelError`` (a
        ``ValueError``) naming a bad label, ``NotFound`` for an unknown device."""
        ...

    async def set_device_stats(self, tenant: str, device_id: str, stats: JsonDict) -> None:
        """Replace the device's stats (telemetry buffer fill, dropped counters, ...)."""
        ...

    async def set_manifest_version(self, tenant: str, device_id: str, version: int) -> None:
        """Record the manifest version the device reports it adopted."""
        ...

    async def set_manifest_versions(self, items: Sequence[tuple[str, str, int]]) -> None:
        """Many ``(tenant, device_id, version)`` at once, one transaction (unknown devices are
        skipped)."""
        ...

    async def put_status_batch(
        self, items: Sequence[tuple[str, str, JsonDict, int]], *, now: float | None = None
    ) -> list[bool | StatusRefusal]:
        """``put_status`` for many ``(tenant, device_id, status, seq)`` in one transaction;
        returns for each whether it was stored (False: older seq, or an unknown device) or,
        for a claim the device may not make, the refusal (logged; nothing stored)."""
        ...

    # -- device identities (the allow-list) ------------------------------------------------
    async def allow_identity(
        self,
        tenant: str,
        device_id: str,
        key_sha256: str,
        not_after: float,
        *,
        now: float | None = None,
    ) -> None:
        """Allow (or re-allow, with a new key) the identity: state ``allowed``, this key."""
        ...

    async def revoke_identity(
        self, tenant: str, device_id: str, *, now: float | None = None
    ) -> None:
        """State ``revoked`` (a revoked identity must enrol again); ``NotFound`` if unknown."""
        ...

    async def get_identity(self, tenant: str, device_id: str) -> IdentityRecord:
        """``NotFound`` if the identity is not on the allow-list."""
        ...

    async def list_identities(self) -> list[IdentityRecord]:
        """Every tenant's identities (the controller loads them into memory at start)."""
        ...

    async def import_identities(
        self,
        items: Sequence[IdentityImport],
        *,
        now: float | None = None,
    ) -> list[IdentityRecord]:
        """``(tenant, device_id, key_sha256, not_after, issued)`` read from allow files, in one
        transaction; returns the records it changed. An item changes an identity only when it
        is newer than the record: unknown, or ``issued`` after the record's ``updated`` (an
        item without ``issued`` counts as newer only with another key). A newer item with the
        recorded key keeps the record's state (a revoked identity stays revoked) and takes the
        later ``not_after``; with another key it allows the identity again."""
        ...

    # -- desired state -------------------------------------------------------------------
    async def put_blob(self, tenant: str, data: bytes, *, digest: str | None = None) -> str:
        """Store ``data`` content-addressed; returns its digest (``ValueError`` if a given
        ``digest`` does not match)."""
        ...

    async def get_blob(self, tenant: str, digest: str) -> bytes: ...

    async def has_blob(self, tenant: str, digest: str) -> bool: ...

    async def missing_blobs(self, tenant: str, digests: Sequence[str]) -> list[str]: ...

    async def put_deployment(
        self,
        tenant: str,
        deployment_id: str,
        *,
        document: bytes,
        name: str,
        profile: str,
        now: float | None = None,
    ) -> DeploymentRecord:
        """Store the document as a blob and record this version of the deployment
        (idempotent for the same bytes)."""
        ...

    async def apply(
        self,
        tenant: str,
        *,
        blobs: Sequence[bytes],
        deployments: Sequence[DeploymentDraft],
        devices: Sequence[str],
        now: float | None = None,
    ) -> list[DeploymentRecord]:
        """One operator apply, all or nothing in one transaction: store the file ``blobs``,
        record each deployment version and assign every one of them to every device of
        ``devices`` (``NotFound`` for an unknown device, and nothing is written), with one
        ``deployment.applied`` event naming the deployments and the devices."""
        ...

    async def get_deployment(
        self, tenant: str, deployment_id: str, digest: str | None = None
    ) -> DeploymentRecord:
        """The given version, or the newest when ``digest`` is None."""
        ...

    async def list_deployments(self, tenant: str) -> list[DeploymentRecord]:
        """The newest version of every deployment of the tenant."""
        ...

    async def assign(
        self,
        tenant: str,
        device_ids: str | Sequence[str],
        deployment_id: str,
        digest: str,
        *,
        now: float | None = None,
    ) -> None:
        """Assign (or re-point) a deployment version to devices, in one transaction.
        ``NotFound`` if a device or the deployment version is unknown."""
        ...

    async def unassign(self, tenant: str, device_id: str, deployment_id: str) -> None:
        """``NotFound`` if that deployment is not assigned to that device."""
        ...

    async def list_assignments(
        self, tenant: str, device_id: str | None = None
    ) -> list[AssignmentRecord]: ...

    async def put_manifest(
        self,
        tenant: str,
        device_id: str,
        version: int,
        manifest: bytes,
        signature: bytes,
        *,
        now: float | None = None,
    ) -> None:
        """``ValueError`` unless ``version`` is above the device's latest manifest version."""
        ...

    async def latest_manifest(self, tenant: str, device_id: str) -> ManifestRecord | None: ...

    async def put_manifests(
        self,
        tenant: str,
        items: Sequence[tuple[str, int, bytes, bytes]],
        *,
        now: float | None = None,
    ) -> None:
        """``put_manifest`` for many ``(device_id, version, manifest, signature)`` at once,
        all or nothing (a fleet-wide change is one transaction, not thousands)."""
        ...

    async def latest_manifests(
        self, tenant: str, device_ids: Sequence[str]
    ) -> dict[str, ManifestRecord]:
        """The newest manifest of each device that has one, in one read."""
        ...

    async def put_status(
        self,
        tenant: str,
        device_id: str,
        status: JsonDict,
        seq: int,
        *,
        now: float | None = None,
    ) -> bool:
        """Store the latest status of ``status["deploymentId"]``; returns False (and changes
        nothing) when a status with this or a later ``seq`` is already stored. ``StatusRefused``
        (logged) when its ``adoptedManifestVersion`` or its deployment was never issued to the
        device (``controller.store.claims``)."""
        ...

    async def put_statuses(
        self,
        tenant: str,
        device_id: str,
        items: Sequence[tuple[JsonDict, int]],
        *,
        now: float | None = None,
    ) -> int:
        """Batch form of ``put_status``; returns how many were stored."""
        ...

    async def list_statuses(
        self, tenant: str, device_id: str | None = None
    ) -> list[StatusRecord]: ...

    # -- telemetry -----------------------------------------------------------------------
    async def ingest_telemetry(
        self,
        tenant: str,
        device_id: str,
        records: Sequence[tuple[int, str, bytes]],
        *,
        now: float | None = None,
    ) -> int:
        """Store ``(seq, stream, payload)`` records durably (duplicates ignored) and return the
        highest contiguous seq now stored: the value the controller may ack."""
        ...

    async def telemetry_watermark(self, tenant: str, device_id: str) -> int:
        """Highest contiguous seq stored (gaps count as stored); 0 before any record, also
        for a device never seen (no ``NotFound``: sessions ask before ``device_connected``)."""
        ...

    async def record_gap(
        self, tenant: str, device_id: str, first: int, last: int, *, now: float | None = None
    ) -> int:
        """The device lost records ``first..last`` (inclusive): remember it, emit a
        ``telemetry.gap`` event, and return the watermark (which may move past the gap)."""
        ...

    async def telemetry_writer(self, tenant: str, device_id: str) -> TelemetryWriter:
        """Check once that the device exists (``NotFound``) and return its telemetry writer,
        which checks it no more: a session's telemetry stream is one device's for its life."""
        ...

    async def query_telemetry(
        self,
        tenant: str,
        device_id: str,
        stream: str | None = None,
        since: float | None = None,
        limit: int = 100,
        *,
        after_seq: int | None = None,
    ) -> list[TelemetryRecord]:
        """Records in ascending seq order. With ``since`` (received_at, unix seconds) or
        ``after_seq``: the first ``limit`` after that point; with neither: the newest
        ``limit``."""
        ...

    async def prune_telemetry(self, tenant: str, before: float) -> int:
        """Delete records received before ``before``; returns how many. (Retention's batched
        deletions: ``controller.retention.RetentionStore``.)"""
        ...

    # -- terminal audit ------------------------------------------------------------------
    async def start_session_audit(
        self,
        tenant: str,
        device_id: str,
        *,
        operator: str,
        command: str | None = None,
        now: float | None = None,
    ) -> int: ...

    async def finish_session_audit(
        self,
        audit_id: int,
        *,
        bytes_in: int = 0,
        bytes_out: int = 0,
        reason: str | None = None,
        now: float | None = None,
        tenant: str | None = None,
        exit_status: int | None = None,
        operator: str | None = None,
    ) -> None:
        """``NotFound`` for an unknown id (or one of another tenant when ``tenant`` is given)."""
        ...

    async def list_session_audits(self, tenant: str, limit: int = 100) -> list[SessionAudit]:
        """Newest first."""
        ...

    # -- events --------------------------------------------------------------------------
    async def add_event(
        self,
        tenant: str,
        kind: str,
        device_id: str | None = None,
        payload: JsonDict | None = None,
        *,
        now: float | None = None,
    ) -> int: ...

    async def list_events(
        self, tenant: str, after_id: int = 0, limit: int = 1000
    ) -> list[EventRecord]: ...

    async def latest_event_id(self, tenant: str) -> int:
        """The id of the tenant's newest event (0 when none): where a live feed starts."""
        ...

    async def wait_events(
        self, tenant: str, after_id: int, *, timeout: float, limit: int = 1000
    ) -> list[EventRecord]:
        """Like ``list_events`` but waits up to ``timeout`` seconds for the first new event;
        returns ``[]`` on timeout. Used by the streaming event feed."""
        ...


def resolve_now(now: float | None) -> float:
    """``now`` when a caller gave one (tests, batch writers), else the wall clock."""
    return time.time() if now is None else now
