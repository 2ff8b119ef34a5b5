"""The embedded store: SQLite in WAL mode, driven from one dedicated worker thread.

Theory of operation
-------------------
SQLite calls block, so none of them may run on the event loop. ``SqliteStore`` owns one
connection and one worker thread (a single-thread executor); every method submits a function
to that thread and awaits the result, so calls are serialised in submission order and the
connection never changes threads (``check_same_thread`` stays on to prove it). Each call runs
in one transaction (``BEGIN IMMEDIATE`` for writes, so a batch is all-or-nothing). The SQL
itself lives in the ``sqlite_*`` modules, one per concern, as plain functions of a connection.

Events appended inside a transaction wake ``wait_events`` callers only after the commit; the
wake-up is delivered with ``call_soon_threadsafe`` to whichever loop the waiter runs on.

SQLite failures become ``StoreError`` naming the database file and saying what to do (disk
full, corrupt or foreign file, locked by another process, newer schema).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from controller.store import sqlite_desired as desired
from controller.store import sqlite_devices as devices
from controller.store import sqlite_events as events
from controller.store import sqlite_telemetry as telemetry
from controller.store.base import (
    AssignmentRecord,
    DeploymentDraft,
    DeploymentRecord,
    DeviceRecord,
    EventRecord,
    JsonDict,
    ManifestRecord,
    SessionAudit,
    TelemetryRecord,
    TelemetryWriter,
)
from controller.store.base import resolve_now as _now
from controller.store.sqlite_errors import store_error
from controller.store.sqlite_events import StoreConnection
from controller.store.sqlite_identities import SqliteIdentities
from controller.store.sqlite_loop import (
    BUSY,
    Busy,
    LoopConnection,
    log_checkpoint_failure,
    passive_checkpoint,
    transaction,
)
from controller.store.sqlite_retention import SqliteRetention
from controller.store.sqlite_rollouts import SqliteRollouts
from controller.store.sqlite_schema import MIGRATIONS, TELEMETRY_MIGRATIONS, migrate
from controller.store.sqlite_statuses import SqliteStatuses
from controller.store.sqlite_telemetry import BoundTelemetryWriter
from margo_stream.errors import NotFound, StoreError

T = TypeVar("T")

SMALL_KEYS = 16  # reads and writes of at most this many keys may run on the loop's thread
SMALL_WRITE_BYTES = 64 * 1024  # and writes of at most this many bytes of blobs


def telemetry_db_path(path: str) -> str:
    """``controller.db`` -> ``controller.telemetry.db`` (beside it)."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.telemetry{p.suffix or '.db'}"))


class SqliteStore(SqliteIdentities, SqliteStatuses, SqliteRetention, SqliteRollouts):
    """``Store`` on one SQLite file. Use ``async with SqliteStore(path) as store:`` or call
    ``open()`` / ``close()``. The methods of the allow-list, of statuses and of retention
    come from ``SqliteIdentities``, ``SqliteStatuses`` and ``SqliteRetention``."""

    write_concurrency = 1  # one writer thread: a second batch at once would only queue

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        telemetry_path: str | os.PathLike[str] | None = None,
        _migrations: tuple[str, ...] = MIGRATIONS,
    ) -> None:
        self.path = str(Path(path))
        self._busy_timeout = busy_timeout
        self._migrations = _migrations
        # Telemetry lives in its own file with its own thread: bulk ingest never delays the
        # control plane (pushes, statuses, the API) behind its transactions.
        self._bulk: SqliteStore | None = None
        if _migrations is MIGRATIONS:
            self._bulk = SqliteStore(
                telemetry_path or telemetry_db_path(self.path),
                busy_timeout=busy_timeout,
                _migrations=TELEMETRY_MIGRATIONS,
            )
        self._executor: ThreadPoolExecutor | None = None
        self._conn: StoreConnection | None = None
        self._here: LoopConnection | None = None  # small calls on the loop's thread
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None], str]] = set()
        self._waiters_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="margo-store")
        try:
            await self._submit(self._connect)
            if self._migrations is MIGRATIONS:
                self._here = LoopConnection(
                    self.path, wake=self._wake, checkpoint=self._ask_checkpoint
                )
                self._here.open()
            if self._bulk is not None:
                await self._bulk.open()
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        if self._executor is None:
            return
        try:
            if self._here is not None:
                self._here.close()
                self._here = None
            if self._bulk is not None:
                await self._bulk.close()
            await self._submit(self._disconnect)
        finally:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _connect(self) -> None:
        parent = Path(self.path).parent
        if not parent.is_dir():
            raise StoreError(f"cannot open database {self.path}: directory {parent} does not exist")
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            factory=StoreConnection,
        )
        assert isinstance(conn, StoreConnection)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"database {self.path}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
            migrate(conn, self.path, self._migrations)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA optimize")
            finally:
                self._conn.close()
                self._conn = None

    # -- the worker thread ---------------------------------------------------------------

    async def _submit(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreError(f"store {self.path} is not open")
        future = self._executor.submit(self._guarded, fn, *args)
        return await asyncio.wrap_future(future)

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from exc

    def _in_tx(self, write: bool, fn: Callable[..., T], *args: Any) -> T:
        conn = self._conn
        if conn is None:
            raise StoreError(f"store {self.path} is closed")
        result = transaction(conn, "BEGIN IMMEDIATE" if write else "BEGIN", fn, *args)
        tenants = conn.take_event_tenants()
        if tenants:
            self._wake(tenants)
        return result

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._submit(self._in_tx, True, fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._submit(self._in_tx, False, fn, *args)

    async def _read_small(self, fn: Callable[..., T], *args: Any) -> T:
        """A read bounded by an index and a few keys: on the loop's own connection when it
        can take it now (no thread hop), on the worker thread otherwise."""
        result = BUSY if self._here is None else self._here.read(fn, *args)
        return await self._read(fn, *args) if isinstance(result, Busy) else result

    async def _write_small(self, fn: Callable[..., T], *args: Any) -> T:
        """A write of a few rows: on the loop's own connection when the write lock is free
        (no thread hop, no fsync: see ``sqlite_loop``), on the worker thread otherwise."""
        result = self._write_here(fn, *args)
        return await self._write(fn, *args) if isinstance(result, Busy) else result

    def _write_here(self, fn: Callable[..., T], *args: Any) -> T | Busy:
        """``_write_small`` without waiting at all: ``BUSY`` when the loop's connection cannot
        take the write now (the caller then goes the asynchronous way)."""
        return BUSY if self._here is None else self._here.write(fn, *args)

    def _ask_checkpoint(self) -> None:
        if self._executor is not None:
            done = self._executor.submit(self._guarded, lambda: passive_checkpoint(self._conn))
            done.add_done_callback(log_checkpoint_failure)

    def _wake(self, tenants: set[str]) -> None:
        with self._waiters_lock:
            targets = [(loop, fut) for loop, fut, t in self._waiters if t in tenants]
        for loop, fut in targets:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that loop is closed
                pass

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
        return await self._write(
            devices.device_connected,
            tenant,
            device_id,
            capabilities,
            None if reported_labels is None else dict(reported_labels),
            manifest_version,
            remote,
            _now(now),
        )

    async def device_disconnected(
        self, tenant: str, device_id: str, now: float | None = None
    ) -> None:
        await self._write(devices.device_disconnected, tenant, device_id, _now(now))

    async def touch_devices(self, batch: Sequence[tuple[str, str, float]]) -> None:
        if batch:
            await self._write(devices.touch_devices, list(batch))

    async def mark_all_disconnected(self) -> int:
        return await self._write(devices.mark_all_disconnected)

    async def list_devices(self, tenant: str) -> list[DeviceRecord]:
        return await self._read(devices.list_devices, tenant)

    async def get_device(self, tenant: str, device_id: str) -> DeviceRecord:
        return await self._read_small(devices.get_device, tenant, device_id)

    async def set_labels(self, tenant: str, device_id: str, labels: dict[str, str]) -> None:
        await self._write(devices.set_labels, tenant, device_id, dict(labels), time.time())

    async def update_labels(
        self, tenant: str, device_id: str, changes: dict[str, str | None]
    ) -> dict[str, str]:
        return await self._write(
            devices.update_labels, tenant, device_id, dict(changes), time.time()
        )

    async def set_device_stats(self, tenant: str, device_id: str, stats: JsonDict) -> None:
        await self._write(devices.set_device_stats, tenant, device_id, stats)

    async def set_manifest_version(self, tenant: str, device_id: str, version: int) -> None:
        await self._write(devices.set_manifest_version, tenant, device_id, version)

    async def set_manifest_versions(self, items: Sequence[tuple[str, str, int]]) -> None:
        def run(conn: StoreConnection) -> None:
            for tenant, device_id, version in items:
                with contextlib.suppress(NotFound):  # the device was deleted meanwhile
                    devices.set_manifest_version(conn, tenant, device_id, version)

        await self._submit(self._in_tx, True, run)

    # -- desired state -------------------------------------------------------------------

    async def put_blob(self, tenant: str, data: bytes, *, digest: str | None = None) -> str:
        return await self._write(desired.put_blob, tenant, data, digest, time.time())

    async def get_blob(self, tenant: str, digest: str) -> bytes:
        return await self._read(desired.get_blob, tenant, digest)

    async def has_blob(self, tenant: str, digest: str) -> bool:
        return await self._read_small(desired.has_blob, tenant, digest)

    async def missing_blobs(self, tenant: str, digests: Sequence[str]) -> list[str]:
        read = self._read_small if len(digests) <= SMALL_KEYS else self._read
        return await read(desired.missing_blobs, tenant, list(digests))

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
        return await self._write(
            desired.put_deployment, tenant, deployment_id, document, name, profile, _now(now)
        )

    async def apply(
        self,
        tenant: str,
        *,
        blobs: Sequence[bytes],
        deployments: Sequence[DeploymentDraft],
        devices: Sequence[str],
        now: float | None = None,
    ) -> list[DeploymentRecord]:
        small = (
            len(devices) <= SMALL_KEYS
            and len(deployments) <= SMALL_KEYS
            and sum(len(b) for b in blobs) + sum(len(d.document) for d in deployments)
            <= SMALL_WRITE_BYTES
        )
        write = self._write_small if small else self._write
        return await write(
            desired.apply, tenant, list(blobs), list(deployments), list(devices), _now(now)
        )

    async def get_deployment(
        self, tenant: str, deployment_id: str, digest: str | None = None
    ) -> DeploymentRecord:
        return await self._read_small(desired.get_deployment, tenant, deployment_id, digest)

    async def list_deployments(self, tenant: str) -> list[DeploymentRecord]:
        return await self._read(desired.list_deployments, tenant)

    async def assign(
        self,
        tenant: str,
        device_ids: str | Sequence[str],
        deployment_id: str,
        digest: str,
        *,
        now: float | None = None,
    ) -> None:
        ids = [device_ids] if isinstance(device_ids, str) else list(device_ids)
        await self._write(desired.assign, tenant, ids, deployment_id, digest, _now(now))

    async def unassign(self, tenant: str, device_id: str, deployment_id: str) -> None:
        await self._write(desired.unassign, tenant, device_id, deployment_id, time.time())

    async def list_assignments(
        self, tenant: str, device_id: str | None = None
    ) -> list[AssignmentRecord]:
        read = self._read if device_id is None else self._read_small
        return await read(desired.list_assignments, tenant, device_id)

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
        await self._write(
            desired.put_manifest, tenant, device_id, version, manifest, signature, _now(now)
        )

    async def latest_manifest(self, tenant: str, device_id: str) -> ManifestRecord | None:
        return await self._read_small(desired.latest_manifest, tenant, device_id)

    async def put_manifests(
        self,
        tenant: str,
        items: Sequence[tuple[str, int, bytes, bytes]],
        *,
        now: float | None = None,
    ) -> None:
        write = self._write_small if len(items) <= SMALL_KEYS else self._write
        await write(desired.put_manifests, tenant, list(items), _now(now))

    async def latest_manifests(
        self, tenant: str, device_ids: Sequence[str]
    ) -> dict[str, ManifestRecord]:
        read = self._read_small if len(device_ids) <= SMALL_KEYS else self._read
        return await read(desired.latest_manifests, tenant, list(device_ids))

    # -- telemetry -----------------------------------------------------------------------

    @property
    def _telemetry(self) -> SqliteStore:
        if self._bulk is None:
            raise StoreError(f"store {self.path} holds no telemetry")
        return self._bulk

    async def ingest_telemetry(
        self,
        tenant: str,
        device_id: str,
        records: Sequence[tuple[int, str, bytes]],
        *,
        now: float | None = None,
    ) -> int:
        await self._read(devices.require_device, tenant, device_id)
        return await self._ingest(tenant, device_id, records, now=now)

    async def _ingest(
        self,
        tenant: str,
        device_id: str,
        records: Sequence[tuple[int, str, bytes]],
        *,
        now: float | None,
    ) -> int:
        return await self._telemetry._write(
            telemetry.ingest_telemetry, tenant, device_id, list(records), _now(now)
        )

    async def telemetry_writer(self, tenant: str, device_id: str) -> TelemetryWriter:
        await self._read(devices.require_device, tenant, device_id)
        return BoundTelemetryWriter(
            partial(self.telemetry_watermark, tenant, device_id),
            partial(self._ingest, tenant, device_id, now=None),
            partial(self._record_gap, tenant, device_id, now=None),
        )

    async def telemetry_watermark(self, tenant: str, device_id: str) -> int:
        return await self._telemetry._read(telemetry.telemetry_watermark, tenant, device_id)

    async def record_gap(
        self, tenant: str, device_id: str, first: int, last: int, *, now: float | None = None
    ) -> int:
        await self._read(devices.require_device, tenant, device_id)
        return await self._record_gap(tenant, device_id, first, last, now=now)

    async def _record_gap(
        self, tenant: str, device_id: str, first: int, last: int, *, now: float | None
    ) -> int:
        watermark = await self._telemetry._write(
            telemetry.record_gap, tenant, device_id, first, last, _now(now)
        )
        await self.add_event(
            tenant,
            "telemetry.gap",
            device_id,
            {"first": first, "last": last, "count": last - first + 1},
            now=now,
        )
        return watermark

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
        await self._read(devices.require_device, tenant, device_id)
        return await self._telemetry._read(
            telemetry.query_telemetry, tenant, device_id, stream, since, limit, after_seq
        )

    # -- terminal audit ------------------------------------------------------------------

    async def start_session_audit(
        self,
        tenant: str,
        device_id: str,
        *,
        operator: str,
        command: str | None = None,
        now: float | None = None,
    ) -> int:
        return await self._write(
            events.start_session_audit, tenant, device_id, operator, command, _now(now)
        )

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
        await self._write(
            events.finish_session_audit,
            audit_id,
            bytes_in,
            bytes_out,
            reason,
            _now(now),
            tenant,
            exit_status,
            operator,
        )

    async def list_session_audits(self, tenant: str, limit: int = 100) -> list[SessionAudit]:
        return await self._read(events.list_session_audits, tenant, limit)

    # -- events --------------------------------------------------------------------------

    async def add_event(
        self,
        tenant: str,
        kind: str,
        device_id: str | None = None,
        payload: JsonDict | None = None,
        *,
        now: float | None = None,
    ) -> int:
        return await self._write(events.add_event, tenant, kind, device_id, payload, _now(now))

    async def list_events(
        self, tenant: str, after_id: int = 0, limit: int = 1000
    ) -> list[EventRecord]:
        return await self._read(events.list_events, tenant, after_id, limit)

    async def latest_event_id(self, tenant: str) -> int:
        return await self._read(events.latest_event_id, tenant)

    async def wait_events(
        self, tenant: str, after_id: int, *, timeout: float, limit: int = 1000
    ) -> list[EventRecord]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            entry = (loop, fut, tenant)
            with self._waiters_lock:
                self._waiters.add(entry)
            try:
                # Registered before reading, so an event committed in between still wakes us.
                found = await self.list_events(tenant, after_id, limit)
                if found:
                    return found
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return []
                try:
                    await asyncio.wait_for(fut, remaining)
                except TimeoutError:
                    return []
            finally:
                with self._waiters_lock:
                    self._waiters.discard(entry)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
