"""The store side every device-facing transport shares: :class:`DeviceBackend`.

It keeps, per device, the newest signed desired state with its Margo rc.3 projection and
ETags (:class:`Desired`, cached until the stored version changes), stores status and
capability documents validated once (``margo_documents``), numbers status reports, and
batches last-seen times into one store write every ``touch_interval`` seconds.

A transport authenticates the peer first (``tls.peer_identity``) and passes only the verified
``(tenant, device_id)``: nothing in a path or a payload can name another device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import anyio

from controller.device_api.margo_documents import validate_capabilities, validate_status
from controller.problems import Problem
from controller.store.base import Store
from controller.store.claims import UNKNOWN_VERSION, StatusRefusal, StatusRefused
from margo_stream.errors import DocumentError, NotFound
from margo_stream.state.digest import sha256_digest
from margo_stream.state.manifest import (
    Manifest,
    blob_digests,
    canonical_json,
    margo_manifest,
    parse_manifest,
)

log = logging.getLogger("margo.device_api")


@dataclass(frozen=True, slots=True)
class Desired:
    """One device's newest signed desired state and its views."""

    tenant: str
    device_id: str
    version: int
    manifest_bytes: bytes  # the exact signed bytes
    signature: bytes
    manifest: Manifest
    margo_body: bytes  # canonical JSON of Margo rc.3's UnsignedAppStateManifest
    margo_etag: str  # digest of margo_body
    signed_etag: str  # digest of manifest_bytes

    @property
    def digests(self) -> set[str]:
        return blob_digests(self.manifest)


def refused_problem(refusal: StatusRefusal) -> Problem:
    """409 for a status claiming what the device was never issued (not retryable: the same
    claim is refused again)."""
    field = "adoptedManifestVersion" if refusal.reason == UNKNOWN_VERSION else "deploymentId"
    return Problem(
        409,
        refusal.describe(),
        title="Status refused",
        kind="status-refused",
        errors=[{"field": field, "message": refusal.reason}],
    )


class DeviceBackend:
    """The store-side logic every alternative transport shares."""

    def __init__(self, store: Store, *, touch_interval: float = 5.0) -> None:
        self.store = store
        self.touch_interval = touch_interval
        self._cache: dict[tuple[str, str], Desired] = {}
        self._seen: dict[tuple[str, str], float] = {}
        self._last_seq: dict[tuple[str, str], int] = {}
        self._adopted: dict[tuple[str, str], int] = {}

    async def desired(self, tenant: str, device_id: str) -> Desired | None:
        """The newest manifest for the device (None when it has none)."""
        record = await self.store.latest_manifest(tenant, device_id)
        if record is None:
            return None
        key = (tenant, device_id)
        cached = self._cache.get(key)
        if cached is not None and cached.version == record.version:
            return cached
        try:
            manifest = parse_manifest(record.manifest)
        except DocumentError as exc:
            log.error(
                "stored manifest v%d of %s/%s is invalid: %s",
                record.version,
                tenant,
                device_id,
                exc,
            )
            raise Problem(
                500, "the stored manifest is invalid", title="Internal error", kind="internal"
            ) from None
        if manifest.tenant != tenant or manifest.device_id != device_id:
            raise Problem(
                500,
                "the stored manifest names another device",
                title="Internal error",
                kind="internal",
            )
        body = canonical_json(margo_manifest(manifest))
        desired = Desired(
            tenant,
            device_id,
            record.version,
            record.manifest,
            record.signature,
            manifest,
            body,
            sha256_digest(body),
            sha256_digest(record.manifest),
        )
        self._cache[key] = desired
        return desired

    async def blobs(self, tenant: str, digests: set[str] | list[str]) -> dict[str, bytes]:
        return {d: await self.store.get_blob(tenant, d) for d in sorted(digests)}

    def next_seq(self, tenant: str, device_id: str) -> int:
        """Status sequence numbers: microseconds of wall time, strictly increasing per device,
        so they stay ordered across controller restarts."""
        key = (tenant, device_id)
        seq = max(self._last_seq.get(key, 0) + 1, time.time_ns() // 1000)
        self._last_seq[key] = seq
        return seq

    async def _ensure_device(self, tenant: str, device_id: str, remote: str) -> None:
        try:
            await self.store.get_device(tenant, device_id)
        except NotFound:
            await self.store.device_connected(
                tenant,
                device_id,
                capabilities={},
                reported_labels=None,
                manifest_version=None,
                remote=remote,
            )

    async def put_status(
        self, tenant: str, device_id: str, doc: Any, deployment_id: str, remote: str = ""
    ) -> bool:
        """Validate and store a Margo status document (``Problem`` 400 for a bad one, 409 for
        a claim the store refuses: a manifest version or deployment never issued to the
        device); the adopted version is recorded only for a status the store accepted."""
        status = validate_status(doc, deployment_id, device_id)
        seq = self.next_seq(tenant, device_id)
        try:
            try:
                stored = await self.store.put_status(tenant, device_id, status, seq)
            except NotFound:
                await self._ensure_device(tenant, device_id, remote)
                stored = await self.store.put_status(tenant, device_id, status, seq)
        except StatusRefused as exc:  # the store logged it
            raise refused_problem(exc.refusal) from None
        adopted = status["adoptedManifestVersion"]
        key = (tenant, device_id)
        if adopted > self._adopted.get(key, 0):
            self._adopted[key] = adopted
            try:
                await self.store.set_manifest_version(tenant, device_id, adopted)
            except NotFound:
                pass
        self.seen(tenant, device_id)
        return stored

    async def put_capabilities(
        self, tenant: str, device_id: str, path_device_id: str, doc: Any, remote: str
    ) -> bool:
        """Store the capabilities; True when the device was not known before (201). The
        document's labels are the device's claim: they replace its reported labels only."""
        caps, reported = validate_capabilities(doc, path_device_id, device_id)
        try:
            record = await self.store.get_device(tenant, device_id)
            created, version = False, record.manifest_version
        except NotFound:
            created, version = True, None
        await self.store.device_connected(
            tenant,
            device_id,
            capabilities=caps,
            reported_labels=reported,
            manifest_version=version,
            remote=remote,
        )
        return created

    async def connected(
        self, tenant: str, device_id: str, remote: str, manifest_version: int | None
    ) -> None:
        """A push transport's long-lived session started (capabilities kept as stored)."""
        try:
            record = await self.store.get_device(tenant, device_id)
            caps = record.capabilities
            version = manifest_version if manifest_version else record.manifest_version
        except NotFound:
            caps, version = {}, manifest_version
        await self.store.device_connected(
            tenant,
            device_id,
            capabilities=caps,
            reported_labels=None,
            manifest_version=version,
            remote=remote,
        )

    async def disconnected(self, tenant: str, device_id: str) -> None:
        try:
            await self.store.device_disconnected(tenant, device_id)
        except NotFound:
            pass

    def seen(self, tenant: str, device_id: str) -> None:
        self._seen[(tenant, device_id)] = time.time()

    async def flush_seen(self) -> None:
        if not self._seen:
            return
        batch = [(t, d, ts) for (t, d), ts in self._seen.items()]
        self._seen.clear()
        try:
            await self.store.touch_devices(batch)
        except Exception:
            log.exception("could not record last-seen times")

    async def touch_loop(self) -> None:
        while True:
            await anyio.sleep(self.touch_interval)
            await self.flush_seen()


__all__ = ["Desired", "DeviceBackend"]
