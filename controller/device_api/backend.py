"""The store side every device-facing transport shares: :class:`DeviceBackend`.

It keeps, per device, the newest signed desired state with its Margo rc.3 projection, its
bundle (``margo_stream.state.bundle``: the tar.gz of the exact deployment documents, built
once per set of documents) and ETags (:class:`Desired`, cached until the stored version
changes), stores status and capability documents validated once (``margo_documents``),
numbers status reports, and batches last-seen times into one store write every
``touch_interval`` seconds.

Capabilities of a child device (``gateway/child``, reported by the gateway) are stored as a
device of the tenant under that id; ``DELETE /api/v1/capabilities/{deviceId}`` (rc.3 "Remove
device (Unregister)") drops the stored capabilities and reported labels and marks the device
disconnected: the device's record, its operator labels, assignments and history stay, and its
identity stays on the allow-list (taking a device out of the fleet is an operator's act).

A transport authenticates the peer first (``tls.peer_identity``) and passes only the verified
``(tenant, device_id)``: nothing in a path or a payload can name another device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import anyio

from controller.device_api.margo_documents import (
    may_speak_for,
    validate_capabilities,
    validate_status,
)
from controller.problems import Problem
from controller.store.base import Store
from controller.store.claims import UNKNOWN_VERSION, StatusRefusal, StatusRefused
from margo_stream.errors import DocumentError, NotFound
from margo_stream.state.bundle import BUNDLE_MEDIA_TYPE, build_bundle, bundle_url
from margo_stream.state.digest import sha256_digest
from margo_stream.state.manifest import (
    Manifest,
    blob_digests,
    canonical_json,
    margo_manifest,
    parse_manifest,
)

log = logging.getLogger("margo.device_api")

BUNDLE_CACHE = 256  # distinct deployment sets whose bundle is kept


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
    bundle: bytes | None = None  # the tar.gz of the deployments (None without deployments)
    bundle_digest: str | None = None

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
        # bundles by the documents they hold: devices with the same deployments share one
        self._bundles: dict[tuple[tuple[str, str], ...], tuple[bytes, str]] = {}

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
            raise Problem(500, "the stored manifest is invalid", kind="internal") from None
        if manifest.tenant != tenant or manifest.device_id != device_id:
            raise Problem(
                500,
                "the stored manifest names another device",
                kind="internal",
            )
        view = margo_manifest(manifest)
        bundle, bundle_digest = await self._bundle(tenant, manifest)
        if bundle is not None:
            view["bundle"] = {
                "mediaType": BUNDLE_MEDIA_TYPE,
                "digest": bundle_digest,
                "url": bundle_url(bundle_digest),
                "sizeBytes": len(bundle),
            }
        body = canonical_json(view)
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
            bundle,
            bundle_digest or None,
        )
        self._cache[key] = desired
        return desired

    async def _bundle(self, tenant: str, manifest: Manifest) -> tuple[bytes | None, str]:
        """The manifest's bundle and its digest ((None, "") without deployments)."""
        members = tuple(sorted((e.deployment_id, e.digest) for e in manifest.deployments))
        if not members:
            return None, ""
        cached = self._bundles.get(members)
        if cached is None:
            docs = [(dep, await self.store.get_blob(tenant, dg)) for dep, dg in members]
            data = build_bundle(docs)
            cached = (data, sha256_digest(data))
            while len(self._bundles) >= BUNDLE_CACHE:
                self._bundles.pop(next(iter(self._bundles)))
            self._bundles[members] = cached
        return cached

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
        """Store the capabilities of ``path_device_id`` (the client's device or a device
        behind it); True when they were not known before (201). The document's labels are the
        device's claim: they replace its reported labels only."""
        caps, reported = validate_capabilities(doc, path_device_id, device_id)
        if path_device_id != device_id:
            await self._gateway_of(tenant, path_device_id)
        try:
            record = await self.store.get_device(tenant, path_device_id)
            created, version = not record.capabilities, record.manifest_version
        except NotFound:
            created, version = True, None
        await self.store.device_connected(
            tenant,
            path_device_id,
            capabilities=caps,
            reported_labels=reported,
            manifest_version=version,
            remote=remote,
        )
        return created

    async def _gateway_of(self, tenant: str, child_id: str) -> None:
        """404 ``gateway-not-found`` unless the child's parent reported its capabilities."""
        parent = child_id.rsplit("/", 1)[0]
        try:
            known = bool((await self.store.get_device(tenant, parent)).capabilities)
        except NotFound:
            known = False
        if not known:
            raise Problem(
                404,
                f"no gateway {parent!r} has reported its capabilities; report them before those"
                f" of {child_id!r}",
                kind="gateway-not-found",
            )

    async def delete_capabilities(
        self, tenant: str, device_id: str, path_device_id: str, remote: str
    ) -> None:
        """Unregister ``path_device_id``'s capabilities (404 ``device-not-found`` when none
        are stored for it)."""
        if not may_speak_for(device_id, path_device_id):
            raise Problem(
                403,
                f"deviceId {path_device_id[:80]!r} is neither the client certificate's device "
                f"{device_id!r} nor a device behind it",
                kind="not-authorized",
            )
        try:
            record = await self.store.get_device(tenant, path_device_id)
        except NotFound:
            record = None
        if record is None or not record.capabilities:
            raise Problem(
                404,
                f"no capabilities of device {path_device_id[:80]!r} are registered",
                kind="device-not-found",
            )
        await self.store.device_connected(
            tenant,
            path_device_id,
            capabilities={},
            reported_labels={},
            manifest_version=record.manifest_version,
            remote=remote,
        )
        await self.store.device_disconnected(tenant, path_device_id)

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
