"""The PostgreSQL store: the same ``Store`` as SQLite, for fleets past one process or one host.

Theory of operation
-------------------
``PgStore(dsn)`` holds an asyncpg pool (2..10 connections by default: a controller's calls
are short, and many controllers share the server's ``max_connections``) and runs every call
as a coroutine function of a ``Tx`` (``controller.store.pg_events``): a write in one
transaction (so a batch, an apply, is all or nothing), a read as its own statement, and the
hot writes (a telemetry batch, a batch of statuses) as one atomic statement each, which
saves the round trips of BEGIN and COMMIT. The SQL lives in the ``pg_*`` modules, one per
concern, as SQLite's does in ``sqlite_*``; the semantics are the same, and
``tests/unit/test_store_contract.py`` runs one suite against both.

Telemetry ingest shares the pool but at most half of it at once (``telemetry_share``), so a
burst of bulk ingest never leaves the control plane (pushes, statuses, the API) without a
connection; SQLite gets the same effect from a second database file with its own thread.

Events appended by a transaction are numbered and committed in order per tenant and
announced with ``NOTIFY`` (``pg_events``), which wakes ``wait_events`` callers of every
controller on the database (``pg_listen``).

Conflicts between concurrent transactions (serialization failures, deadlocks) are retried a
few times; every other failure of the server or the link becomes ``StoreError`` naming the
database by its DSN without the password (``pg_errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from controller.store import pg_desired as desired
from controller.store import pg_devices as devices
from controller.store import pg_events as events
from controller.store.base import (
    AssignmentRecord,
    DeploymentDraft,
    DeploymentRecord,
    DeviceRecord,
    JsonDict,
    ManifestRecord,
    SessionAudit,
)
from controller.store.base import resolve_now as _now
from controller.store.pg_errors import (
    RETRYABLE,
    is_link_lost,
    is_store_failure,
    redact_dsn,
    store_error,
)
from controller.store.pg_events import STATEMENT, WRITE, Tx
from controller.store.pg_identities import PgIdentities
from controller.store.pg_listen import CONNECT_TIMEOUT, PgEventFeed
from controller.store.pg_retention import PgRetention
from controller.store.pg_rollouts import PgRollouts
from controller.store.pg_schema import migrate
from controller.store.pg_statuses import PgStatuses
from controller.store.pg_telemetry import PgTelemetry
from margo_stream.errors import StoreError

T = TypeVar("T")
RETRIES = 5


async def _no_reset(_conn: object) -> None:
    """The pool's reset: nothing beyond asyncpg's rollback of an open transaction (the store
    leaves no session state on its connections)."""


def _what(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", "a store call").replace("_", " ")


class PgStore(PgIdentities, PgStatuses, PgTelemetry, PgEventFeed, PgRetention, PgRollouts):
    """``Store`` on a PostgreSQL database. Use ``async with PgStore(dsn) as store:`` or call
    ``open()`` / ``close()``. ``path`` is the DSN without its password (for messages)."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        telemetry_share: int | None = None,
    ) -> None:
        if not 1 <= min_size <= max_size:
            raise ValueError(f"pool sizes must satisfy 1 <= min ({min_size}) <= max ({max_size})")
        self._dsn = dsn
        self.path = redact_dsn(dsn)
        self._min_size = min_size
        self._max_size = max_size
        self._bulk_gate = asyncio.Semaphore(telemetry_share or max(1, max_size // 2))
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listening = False
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The DSN as given (with its password: never log it; ``path`` is for messages)."""
        return self._dsn

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool (for modules that keep their own tables in this database).
        A connection goes back to it with its transaction rolled back but no other reset (a
        round trip saved on every call): leave no session state on one (``SET``, session
        advisory locks, ``LISTEN``: use a connection of your own for those)."""
        if self._pool is None:
            raise StoreError(f"store {self.path} is not open")
        return self._pool

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=CONNECT_TIMEOUT,
                server_settings={"application_name": "margo-controller"},
                reset=_no_reset,
            )
        except Exception as exc:
            if is_store_failure(exc):
                raise store_error(self.path, "opening the store", exc) from exc
            raise
        try:
            async with pool.acquire() as conn:
                await migrate(conn, self.path)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, Exception) and is_store_failure(exc):
                raise store_error(self.path, "migrating the schema", exc) from exc
            raise
        self._pool = pool
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()

    async def __aenter__(self) -> PgStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- transactions --------------------------------------------------------------------

    async def _run(self, mode: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``fn(tx, *args)`` in ``mode`` (``pg_events.Transactions``). Run again (a few times)
        after a conflict with another transaction, and after a lost connection when nothing
        can have been written yet (a read; a write not begun or not sent: typically a pooled
        connection the server closed meanwhile)."""
        if self._pool is None:
            raise StoreError(f"store {self.path} is not open")
        pool = self._pool
        for attempt in range(1, RETRIES + 1):
            begun = False
            tx: Tx | None = None
            try:
                async with pool.acquire() as conn:
                    tx = Tx(conn)
                    if mode != WRITE:
                        result = await fn(tx, *args)
                        assert not tx.events, f"{_what(fn)} left events unwritten"
                    else:
                        async with conn.transaction():
                            begun = True
                            result = await fn(tx, *args)
                            await events.flush_events(tx)
            except Exception as exc:
                sent = begun or (tx is not None and tx.writing)
                again = isinstance(exc, RETRYABLE) or (is_link_lost(exc) and not sent)
                if again and attempt < RETRIES:
                    await asyncio.sleep(random.uniform(0, 0.01 * attempt))
                    continue
                if is_store_failure(exc):
                    raise store_error(self.path, _what(fn), exc) from exc
                raise
            if tx.notified:
                self._wake(tx.notified)
            return result
        raise AssertionError("unreachable")

    async def _bulk(self, mode: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async with self._bulk_gate:
            return await self._run(mode, fn, *args)

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
        return await self._run(
            STATEMENT,
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
        await self._run(STATEMENT, devices.device_disconnected, tenant, device_id, _now(now))

    async def touch_devices(self, batch: Sequence[tuple[str, str, float]]) -> None:
        if batch:
            await self._run(STATEMENT, devices.touch_devices, list(batch))

    async def mark_all_disconnected(self) -> int:
        return await self._run(STATEMENT, devices.mark_all_disconnected)

    async def list_devices(self, tenant: str) -> list[DeviceRecord]:
        return await self._read(devices.list_devices, tenant)

    async def get_device(self, tenant: str, device_id: str) -> DeviceRecord:
        return await self._read(devices.get_device, tenant, device_id)

    async def set_labels(self, tenant: str, device_id: str, labels: dict[str, str]) -> None:
        await self._write(devices.set_labels, tenant, device_id, dict(labels), time.time())

    async def update_labels(
        self, tenant: str, device_id: str, changes: dict[str, str | None]
    ) -> dict[str, str]:
        return await self._write(
            devices.update_labels, tenant, device_id, dict(changes), time.time()
        )

    async def set_device_stats(self, tenant: str, device_id: str, stats: JsonDict) -> None:
        await self._run(STATEMENT, devices.set_device_stats, tenant, device_id, stats)

    async def set_manifest_version(self, tenant: str, device_id: str, version: int) -> None:
        await self._run(STATEMENT, devices.set_manifest_version, tenant, device_id, version)

    async def set_manifest_versions(self, items: Sequence[tuple[str, str, int]]) -> None:
        if items:
            await self._run(STATEMENT, devices.set_manifest_versions, list(items))

    # -- desired state -------------------------------------------------------------------

    async def put_blob(self, tenant: str, data: bytes, *, digest: str | None = None) -> str:
        return await self._write(desired.put_blob, tenant, data, digest, time.time())

    async def get_blob(self, tenant: str, digest: str) -> bytes:
        return await self._read(desired.get_blob, tenant, digest)

    async def has_blob(self, tenant: str, digest: str) -> bool:
        return await self._read(desired.has_blob, tenant, digest)

    async def missing_blobs(self, tenant: str, digests: Sequence[str]) -> list[str]:
        return await self._read(desired.missing_blobs, tenant, list(digests))

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
        return await self._write(
            desired.apply, tenant, list(blobs), list(deployments), list(devices), _now(now)
        )

    async def get_deployment(
        self, tenant: str, deployment_id: str, digest: str | None = None
    ) -> DeploymentRecord:
        return await self._read(desired.get_deployment, tenant, deployment_id, digest)

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
        return await self._read(desired.list_assignments, tenant, device_id)

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
        item = (device_id, version, manifest, signature)
        await self._write(desired.put_manifests, tenant, [item], _now(now))

    async def latest_manifest(self, tenant: str, device_id: str) -> ManifestRecord | None:
        return await self._read(desired.latest_manifest, tenant, device_id)

    async def put_manifests(
        self,
        tenant: str,
        items: Sequence[tuple[str, int, bytes, bytes]],
        *,
        now: float | None = None,
    ) -> None:
        if items:
            await self._write(desired.put_manifests, tenant, list(items), _now(now))

    async def latest_manifests(
        self, tenant: str, device_ids: Sequence[str]
    ) -> dict[str, ManifestRecord]:
        if not device_ids:
            return {}
        return await self._read(desired.latest_manifests, tenant, list(device_ids))

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
