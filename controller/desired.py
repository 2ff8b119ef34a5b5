"""Desired state on the controller: build, sign and push each device's manifest.

When an operator changes what a device should run (``desired_changed``) the controller builds
the device's next manifest from its assignments (strictly increasing version, an expiry,
signed with the tenant's key), stores it, and, if the device is connected, pushes it at once
on a fresh desired-state stream: the manifest, then only the blobs the device does not hold,
then the end of the stream. A device that was offline gets the newest manifest right after
its hello (which names the version and blobs it holds). One push per device is in flight at a
time; changes arriving meanwhile coalesce into one follow-up push of the newest version.

A deployment whose ``deviceConstraints`` (or implicit constraint: a ``wasm`` profile needs a
device reporting the wasm runtime) the device's reported capabilities do not satisfy stays
assigned but is left out of the device's manifest (``margo_stream.state.constraints``); the
API shows it as ``failed`` naming the unmet constraint. It is matched again whenever the
device's manifest is next built.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from controller.batching import WriteBatcher
from controller.document_cache import CachedDocument, DocumentCache
from controller.ports import DeviceLink, StoredHook, TaskSpawner
from controller.push_pace import PushPace
from controller.push_window import PushWindow, Slot
from controller.registry import SessionRegistry
from controller.root_chains import RootChains
from controller.store.base import (
    AssignmentRecord,
    DeviceRecord,
    ManifestRecord,
    Store,
    VersionConflict,
)
from margo_stream.errors import ConfigError, DocumentError, IdentityError, StoreError
from margo_stream.identity.trust import load_signing_key
from margo_stream.protocol import messages as m
from margo_stream.protocol.push import blob_chunks, plan_push
from margo_stream.state.constraints import unmet
from margo_stream.state.digest import sha256_digest
from margo_stream.state.documents import Deployment, parse_deployment
from margo_stream.state.manifest import (
    Manifest,
    ManifestEntry,
    blob_digests,
    build_typed_manifest,
    parse_manifest,
    sign,
)
from margo_stream.transport.connection import ConnectionLost, StreamClosed

log = logging.getLogger("margo.controller.desired")

BLOB_CACHE_BYTES = 64 << 20
RESULT_TIMEOUT = 60.0
VERSION_RETRIES = 5  # attempts at the next manifest version when other controllers race us
FIRST_CHUNK, MAX_CHUNK = 32, 512  # devices a fleet-wide change stores (and pushes) at once


def chunks(ids: list[str]) -> Iterator[list[str]]:
    """``ids`` in chunks of 32, 64, 128, 256, then 512 (README: why)."""
    size, start = FIRST_CHUNK, 0
    while start < len(ids):
        yield ids[start : start + size]
        start += size
        size = min(size * 2, MAX_CHUNK)


@dataclass(slots=True)
class _BlobRead:
    """One store read of a blob that every push wanting it at the same moment waits for."""

    done: anyio.Event = field(default_factory=anyio.Event)
    data: bytes | None = None
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class _Current:
    """A device's newest manifest: the stored record and its typed form, parsed once."""

    record: ManifestRecord
    manifest: Manifest
    digests: frozenset[str]

    @classmethod
    def of(cls, record: ManifestRecord, manifest: Manifest | None = None) -> _Current:
        manifest = manifest if manifest is not None else parse_manifest(record.manifest)
        return cls(record, manifest, frozenset(blob_digests(manifest)))


@dataclass(frozen=True, slots=True)
class DesiredConfig:
    certs: Path  # the tenants' signing keys: DIR/<tenant>/signing.key
    manifest_lifetime_days: float
    push_window: int


@dataclass(slots=True)
class _DeviceState:
    pushing: bool = False
    again: bool = False
    held: set[str] = field(default_factory=set)  # blob digests the connected device holds
    root_version: int | None = None  # newest root metadata version the device holds


class DesiredState:
    """Implements ``DesiredChanges`` for the API; ``on_ready``/``on_close`` are session hooks."""

    def __init__(
        self,
        config: DesiredConfig,
        store: Store,
        registry: SessionRegistry,
        tasks: TaskSpawner,
        documents: DocumentCache,
        roots: RootChains,
    ) -> None:
        self.config = config
        self.roots = roots
        self.store = store
        self.registry = registry
        self.tasks = tasks
        self.documents = documents
        self.lifetime = dt.timedelta(days=config.manifest_lifetime_days)
        self._keys: dict[str, Any] = {}
        self._devices: dict[tuple[str, str], _DeviceState] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._latest: dict[tuple[str, str], tuple[int, float]] = {}
        self._current: dict[tuple[str, str], _Current] = {}  # connected devices' newest
        self._blobs: dict[tuple[str, str], bytes] = {}
        self._blob_bytes = 0
        self._blob_reads: dict[tuple[str, str], _BlobRead] = {}
        self.window = PushWindow(config.push_window, pace=PushPace(config.push_window))
        self._adoptions: WriteBatcher[tuple[str, str, int], None] = WriteBatcher(
            store.set_manifest_versions
        )
        self.counters = {"pushes": 0, "bytes": 0, "blobs_sent": 0, "blobs_skipped": 0, "refused": 0}

    def _key(self, tenant: str) -> Any:
        key = self._keys.get(tenant)
        if key is None:
            try:
                key = self._keys[tenant] = load_signing_key(self.config.certs, tenant)
            except IdentityError as exc:
                raise ConfigError(str(exc)) from None
        return key

    def _lock(self, tenant: str) -> anyio.Lock:
        return self._locks.setdefault(tenant, anyio.Lock())

    # --- building manifests ----------------------------------------------------------------------
    async def _unmet(
        self, tenant: str, device_id: str, document: Deployment, devices: dict[str, DeviceRecord]
    ) -> str | None:
        """The deployment's constraint the device does not satisfy (None: it gets it);
        ``devices`` is filled from the store on first need, once per build."""
        if document.constraints is None and str(document.profile) != "wasm":
            return None
        if not devices:
            devices.update({r.device_id: r for r in await self.store.list_devices(tenant)})
        record = devices.get(device_id)
        caps, labels = (record.capabilities, record.reported_labels) if record else ({}, {})
        reason = unmet(document.constraints, str(document.profile), caps, labels)
        if reason is not None:
            log.info(
                "leaving %s out of %s/%s's manifest: %s",
                document.deployment_id,
                tenant,
                device_id,
                reason,
                extra={"event": "deployment-constraint-unmet"},
            )
        return reason

    async def _entries(
        self,
        tenant: str,
        assignments: list[AssignmentRecord],
        devices: dict[str, DeviceRecord] | None = None,
    ) -> list[ManifestEntry]:
        entries = []
        devices = {} if devices is None else devices
        for a in assignments:
            cached = self.documents.get(tenant, a.digest)
            if cached is None:  # applied before this process started
                record = await self.store.get_deployment(tenant, a.deployment_id, a.digest)
                data = await self.store.get_blob(tenant, a.digest)
                source = f"deployment {a.deployment_id}"
                try:
                    # parsing is bounded (yaml_guard) but not free: off the event loop
                    document = await anyio.to_thread.run_sync(
                        functools.partial(parse_deployment, data, source=source)
                    )
                except DocumentError as exc:
                    # stored under older, looser rules; every agent refuses it, so leave it
                    # out rather than hold back the device's other deployments
                    log.warning(
                        "leaving %s out of %s/%s's manifest: %s",
                        a.deployment_id,
                        tenant,
                        a.device_id,
                        exc,
                        extra={"event": "deployment-skipped", "deployment": a.deployment_id},
                    )
                    continue
                cached = CachedDocument(
                    document,
                    json.loads(record.signature) if record.signature else None,
                    record.certificate,
                )
                self.documents.put(tenant, a.digest, cached)
            if await self._unmet(tenant, a.device_id, cached.document, devices):
                continue
            entries.append(
                ManifestEntry(
                    deployment_id=a.deployment_id,
                    digest=a.digest,
                    files=cached.document.files,
                    signature=cached.signature,
                    certificate=cached.certificate,
                )
            )
        return sorted(entries, key=lambda e: e.deployment_id)

    async def rebuild(self, tenant: str, device_id: str, *, floor: int = 0) -> None:
        """Sign and store the device's next manifest (version above ``floor`` and the last)."""
        await self.rebuild_many(tenant, [device_id], floors={device_id: floor})

    async def rebuild_many(
        self,
        tenant: str,
        device_ids: list[str],
        *,
        floors: dict[str, int] | None = None,
        only_if_changed: bool = False,
        on_stored: StoredHook | None = None,
    ) -> list[str]:
        """Sign and store the next manifest of each device; returns the devices that got one.
        Two reads and one write per ``chunks`` of devices; ``on_stored`` hears of each chunk
        once stored (its pushes leave while the rest are built). ``only_if_changed``: a device
        whose deployments are its newest manifest's gets no new version (idempotent)."""
        ids = list(dict.fromkeys(device_ids))
        done: dict[str, bool] = {}  # device -> it got a new manifest (False: left as it was)
        async with self._lock(tenant):
            for attempt in range(1, VERSION_RETRIES + 1):
                try:
                    rest = [i for i in ids if i not in done]
                    await self._rebuild(tenant, rest, floors, only_if_changed, done, on_stored)
                    return [i for i in ids if done[i]]
                except VersionConflict as exc:
                    # another controller of the cluster stored a newer manifest meanwhile:
                    # build on top of it (the chunks stored before it stay stored)
                    if attempt == VERSION_RETRIES:
                        raise StoreError(
                            f"could not store the next manifest after {attempt} attempts: {exc}"
                        ) from None
                    log.info("manifest version taken by another controller, again: %s", exc)
            raise AssertionError("unreachable")

    async def _rebuild(
        self,
        tenant: str,
        ids: list[str],
        floors: dict[str, int] | None,
        only_if_changed: bool,
        done: dict[str, bool],
        on_stored: StoredHook | None,
    ) -> None:
        store = self.store
        latest = await store.latest_manifests(tenant, ids)
        by_device: dict[str, list[AssignmentRecord]] = {d: [] for d in ids}
        for a in await store.list_assignments(tenant, ids[0] if len(ids) == 1 else None):
            if a.device_id in by_device:
                by_device[a.device_id].append(a)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        expires = now + self.lifetime
        created = time.time()
        key = self._key(tenant)
        devices: dict[str, DeviceRecord] = {}  # read once, when a constraint needs it
        for chunk in chunks(ids):
            items: list[tuple[str, int, bytes, bytes]] = []
            built: list[Manifest] = []
            for device_id in chunk:
                entries = await self._entries(tenant, by_device[device_id], devices)
                prev = latest.get(device_id)
                if (
                    only_if_changed
                    and prev is not None
                    and [e.wire() for e in self._typed(prev).deployments]
                    == [e.check().wire() for e in entries]
                ):
                    continue
                version = max(prev.version if prev else 0, (floors or {}).get(device_id, 0)) + 1
                manifest, data = build_typed_manifest(
                    tenant, device_id, version, entries, issued_at=now, expires=expires
                )
                items.append((device_id, version, data, sign(data, key)))
                built.append(manifest)
            if items:
                await store.put_manifests(tenant, items, now=created)
            for (device_id, version, data, signature), manifest in zip(items, built, strict=True):
                self._latest[(tenant, device_id)] = (version, expires.timestamp())
                record = ManifestRecord(
                    tenant=tenant,
                    device_id=device_id,
                    version=version,
                    manifest=data,
                    signature=signature,
                    created=created,
                )
                self._current[(tenant, device_id)] = _Current.of(record, manifest)
            new = [item[0] for item in items]
            done.update(dict.fromkeys(chunk, False) | dict.fromkeys(new, True))
            if new and on_stored is not None:
                on_stored(new)

    def _typed(self, record: ManifestRecord) -> Manifest:
        """The typed form of a stored manifest (from the cache when it is the current one)."""
        current = self._current.get((record.tenant, record.device_id))
        if current is not None and current.record.version == record.version:
            return current.manifest
        return parse_manifest(record.manifest)

    async def _current_of(self, tenant: str, device_id: str) -> _Current | None:
        current = self._current.get((tenant, device_id))
        if current is None:
            record = await self.store.latest_manifest(tenant, device_id)
            if record is not None:
                current = self._current[(tenant, device_id)] = _Current.of(record)
        return current

    async def _blob(self, tenant: str, digest: str) -> bytes:
        """Blobs of a fan-out are read from the store once, not once per device: the pushes
        of a fleet-wide change all start together, so the first one reads and the others wait
        for that read (10,000 queued reads of one blob held a fan-out back by 10 s)."""
        key = (tenant, digest)
        data = self._blobs.get(key)
        if data is not None:
            return data
        flight = self._blob_reads.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            return flight.data
        flight = self._blob_reads[key] = _BlobRead()
        try:
            data = flight.data = await self.store.get_blob(tenant, digest)
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._blob_reads[key]
            flight.done.set()
        self._keep_blob(key, data)
        return data

    def _keep_blob(self, key: tuple[str, str], data: bytes) -> None:
        if len(data) <= BLOB_CACHE_BYTES // 8 and key not in self._blobs:
            while self._blobs and self._blob_bytes + len(data) > BLOB_CACHE_BYTES:
                self._blob_bytes -= len(self._blobs.pop(next(iter(self._blobs))))
            self._blobs[key] = data
            self._blob_bytes += len(data)

    def stored_blobs(self, tenant: str, blobs: Iterable[bytes]) -> None:
        """Blobs the caller has just stored (an apply's documents and files): kept in the
        cache, so the pushes that follow do not read back from the store what was in hand."""
        for data in blobs:
            self._keep_blob((tenant, sha256_digest(data)), data)

    # --- hooks --------------------------------------------------------------------------------------
    async def desired_changed(
        self,
        tenant: str,
        device_ids: list[str],
        *,
        blobs: Sequence[bytes] = (),
        on_stored: StoredHook | None = None,
    ) -> None:
        self.stored_blobs(tenant, blobs)

        def push(stored: list[str]) -> None:
            for device_id in stored:
                link = self.registry.link(tenant, device_id)
                if link is not None:
                    self._schedule(link)
            if on_stored is not None:
                on_stored(stored)

        await self.rebuild_many(tenant, device_ids, only_if_changed=True, on_stored=push)

    async def changed_elsewhere(self, tenant: str, device_ids: list[str]) -> None:
        """Another controller of the cluster built and stored these devices' next manifests:
        forget what this process cached of them and push to those connected here."""
        for device_id in device_ids:
            key = (tenant, device_id)
            self._latest.pop(key, None)
            self._current.pop(key, None)
            link = self.registry.link(tenant, device_id)
            if link is not None:
                self._schedule(link)

    async def resync(self) -> None:
        """Changes of other controllers may have been missed: forget every cached manifest and
        push to each device connected here whose adopted version is not its newest."""
        self._latest.clear()
        self._current.clear()
        by_tenant: dict[str, list[DeviceLink]] = {}
        for session in self.registry:
            link = self.registry.link(session.tenant, session.device_id)
            if link is not None:
                by_tenant.setdefault(session.tenant, []).append(link)
        for tenant, links in by_tenant.items():
            newest = await self.store.latest_manifests(tenant, [link.device_id for link in links])
            for link in links:
                record = newest.get(link.device_id)
                view = self.registry.get(tenant, link.device_id)
                if (
                    record is not None
                    and view is not None
                    and view.manifest_version != record.version
                ):
                    self._schedule(link)

    async def _latest_known(self, tenant: str, device_id: str) -> tuple[int, float] | None:
        """(version, expiry) of the device's newest manifest, ``(0, inf)`` when it has none and
        nothing is assigned, ``None`` when assignments wait for their first manifest. Cached:
        every later change goes through ``rebuild``."""
        key = (tenant, device_id)
        known = self._latest.get(key)
        if known is None:
            current = await self._current_of(tenant, device_id)
            if current is not None:
                known = (current.record.version, current.manifest.expires.timestamp())
            elif await self.store.list_assignments(tenant, device_id):
                return None
            else:
                known = (0, math.inf)
            self._latest[key] = known
        return known

    async def on_ready(self, session: DeviceLink) -> None:
        hello = session.hello
        assert hello is not None
        state = self._devices.setdefault((session.tenant, session.device_id), _DeviceState())
        state.held = set(hello.blobs)
        # the hello's answer carried every root metadata version newer than the device's (the
        # device adopts them before it applies a push); pushes carry only later rotations
        try:
            newest = len(self.roots.chain(session.tenant))
        except IdentityError:
            newest = 0
        state.root_version = max(hello.root_version or 0, newest) or None
        held = hello.manifest_version or 0
        known = await self._latest_known(session.tenant, session.device_id)
        if known is None or held > known[0]:
            # never built, or the device holds a version this store never issued (restored
            # backup?): build one past it
            await self.rebuild(session.tenant, session.device_id, floor=held)
        elif known[0] == 0:
            return  # nothing assigned
        elif known[1] < time.time() + self.lifetime.total_seconds() / 4:
            await self.rebuild(session.tenant, session.device_id)  # refresh before it expires
        elif held == known[0]:
            return
        self._schedule(session)

    def on_close(self, session: DeviceLink) -> None:
        key = (session.tenant, session.device_id)
        view = self.registry.get(*key)
        if view is None or view.handle is session:  # gone, not replaced
            self._current.pop(key, None)  # memory follows the connected fleet
            state = self._devices.get(key)
            if state is not None:
                state.again = False

    # --- pushing ------------------------------------------------------------------------------------
    def _schedule(self, session: DeviceLink) -> None:
        key = (session.tenant, session.device_id)
        state = self._devices.setdefault(key, _DeviceState())
        state.again = True
        if not state.pushing:
            state.pushing = True
            self.tasks.spawn(self._push_loop, key, state)

    async def _push_loop(self, key: tuple[str, str], state: _DeviceState) -> None:
        """Push the newest manifest to the device's *current* session until no change is
        pending: a push that failed with its connection is retried on the one replacing it."""
        try:
            while state.again:
                state.again = False
                session = self.registry.link(*key)
                if session is None:
                    return  # offline: the next hello catches up
                async with self.window.slot() as slot:
                    await self._push(session, state, slot)
        finally:
            state.pushing = False

    async def _push(self, session: DeviceLink, state: _DeviceState, slot: Slot) -> None:
        current = await self._current_of(session.tenant, session.device_id)
        if current is None or session.conn.closed is not None:
            return
        record = current.record
        root = self.roots.newer_than(session.tenant, state.root_version)
        opener = plan_push(
            record.version, record.manifest, record.signature, current.digests, state.held, root
        )
        needed = opener.blobs
        # the first blob is in hand before anything is sent, so that a small push (the
        # manifest and one document) leaves in one packet rather than a header first and the
        # document when the store has answered
        first = await self._blob(session.tenant, needed[0]) if needed else b""
        if session.conn.closed is not None:
            return
        stream = session.conn.open_stream(limit=4)
        sent = 0
        try:
            stream.send(opener)
            sent += len(record.manifest) + len(record.signature)
            for n, digest in enumerate(needed):
                data = first if n == 0 else await self._blob(session.tenant, digest)
                for chunk in blob_chunks(digest, data):
                    stream.send(chunk)
                sent += len(data)
            stream.end()
            # out now: the rest of this loop turn may be long (the apply's HTTP answer, other
            # pushes being built), and nothing more of this connection joins it
            session.conn.transmit()
            self.counters["pushes"] += 1
            self.counters["bytes"] += sent
            self.counters["blobs_sent"] += len(needed)
            self.counters["blobs_skipped"] += len(current.digests) - len(needed)
            with anyio.fail_after(RESULT_TIMEOUT):
                result = await stream.receive()
            slot.answered()  # the device's verdict: how long it took teaches the window
        except (ConnectionLost, StreamClosed, TimeoutError) as exc:
            log.info(
                "push of version %d to %s/%s did not complete: %s",
                record.version,
                session.tenant,
                session.device_id,
                exc,
            )
            return
        finally:
            session.conn.forget_stream(stream.stream_id)
        if not isinstance(result, m.DesiredResult):
            reason = getattr(result, "reason", "stream ended without a result")
            log.warning(
                "device %s/%s answered the push with %s", session.tenant, session.device_id, reason
            )
            return
        if result.ok:
            state.held = set(current.digests)  # the agent keeps only what its manifest names
            if root:
                state.root_version = (state.root_version or 0) + len(root)
            view = self.registry.get(session.tenant, session.device_id)
            if view is not None and view.handle is session:
                view.manifest_version = record.version
            await self._adoptions.submit((session.tenant, session.device_id, record.version))
            log.info(
                "device %s/%s adopted manifest version %d",
                session.tenant,
                session.device_id,
                record.version,
                extra={"event": "desired-adopted", "bytes": sent, "blobs_sent": len(needed)},
            )
        else:
            self.counters["refused"] += 1
            log.warning(
                "device %s/%s refused manifest version %d: %s: %s",
                session.tenant,
                session.device_id,
                record.version,
                result.code,
                result.reason,
                extra={"event": "desired-refused", "code": result.code},
            )
            await self.store.add_event(
                session.tenant,
                "desired.refused",
                session.device_id,
                {"manifestVersion": record.version, "code": result.code, "reason": result.reason},
            )
