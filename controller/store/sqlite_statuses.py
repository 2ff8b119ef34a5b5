"""SQLite store, part: the deployment statuses devices report, and what they may claim.

The functions run on the worker thread inside the caller's transaction. ``put_status`` checks
the claim first (``controller.store.claims``: the manifest version and the deployment must
have been issued to the device) against ``manifests`` and ``issued_deployments``; the latter
is filled by ``record_issued`` whenever a manifest is stored. ``SqliteStatuses`` holds the
``Store`` methods and logs every refusal once the transaction is over.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from controller.store.base import JsonDict, StatusRecord
from controller.store.base import resolve_now as _now
from controller.store.claims import (
    NOT_ISSUED,
    UNKNOWN_VERSION,
    RefusalLog,
    StatusRefusal,
    StatusRefused,
)
from controller.store.sqlite_devices import require_device
from controller.store.sqlite_events import StoreConnection, add_event, dumps, loads
from controller.store.sqlite_loop import Busy
from margo_stream.errors import NotFound

_MAX_SQLITE_INT = 2**63 - 1
log_refusal = RefusalLog()


def per_deployment(
    conn: StoreConnection, columns: str, table: str, tenant: str, device_id: str | None
) -> list[tuple[Any, ...]]:
    """Rows of a per-(device, deployment) table: the tenant's, or one device's."""
    sql = f"SELECT {columns} FROM {table} WHERE tenant = ?"
    if device_id is None:
        return conn.execute(sql + " ORDER BY device_id, deployment_id", (tenant,)).fetchall()
    return conn.execute(
        sql + " AND device_id = ? ORDER BY deployment_id", (tenant, device_id)
    ).fetchall()


# -- what was issued -------------------------------------------------------------------------


def issued_deployment_ids(manifest: bytes) -> list[str]:
    """The deployment ids a stored manifest lists (``[]`` for bytes that are no manifest: the
    store keeps what it is given, the signer built it)."""
    try:
        doc = json.loads(manifest)
    except (ValueError, UnicodeDecodeError):
        return []
    deployments = doc.get("deployments") if isinstance(doc, dict) else None
    if not isinstance(deployments, list):
        return []
    return [
        d["deploymentId"]
        for d in deployments
        if isinstance(d, dict) and isinstance(d.get("deploymentId"), str)
    ]


def record_issued(
    conn: StoreConnection, tenant: str, device_id: str, version: int, manifest: bytes
) -> None:
    """Remember which deployments manifest ``version`` issued to the device. A device's
    versions only grow (``put_manifest``), so the first version that listed a deployment is
    the one already recorded: later ones are ignored."""
    ids = issued_deployment_ids(manifest)
    if ids:
        conn.executemany(
            "INSERT OR IGNORE INTO issued_deployments"
            " (tenant, device_id, deployment_id, first_version) VALUES (?, ?, ?, ?)",
            [(tenant, device_id, d, version) for d in ids],
        )


def check_claim(
    conn: StoreConnection, tenant: str, device_id: str, deployment_id: str, status: JsonDict
) -> StatusRefusal | None:
    """None when the device may report this status (see ``controller.store.claims``)."""
    claimed = status.get("adoptedManifestVersion")
    if (
        not isinstance(claimed, int)
        or isinstance(claimed, bool)
        or not 0 < claimed <= _MAX_SQLITE_INT
    ):
        return StatusRefusal(tenant, device_id, deployment_id, claimed, UNKNOWN_VERSION)
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM manifests"
        "  WHERE tenant = ? AND device_id = ? AND version = ?),"
        " (SELECT first_version FROM issued_deployments"
        "  WHERE tenant = ? AND device_id = ? AND deployment_id = ?)",
        (tenant, device_id, claimed, tenant, device_id, deployment_id),
    ).fetchone()
    if not row[0]:
        return StatusRefusal(tenant, device_id, deployment_id, claimed, UNKNOWN_VERSION)
    if row[1] is None or row[1] > claimed:
        return StatusRefusal(tenant, device_id, deployment_id, claimed, NOT_ISSUED)
    return None


# -- statuses --------------------------------------------------------------------------------


def status_deployment_id(status: dict[str, Any]) -> str:
    value = status.get("deploymentId", status.get("deployment_id"))
    if not isinstance(value, str) or not value:
        raise ValueError("a deployment status needs a non-empty 'deploymentId'")
    return value


def status_state(status: dict[str, Any]) -> str | None:
    """The overall state of a status dict, in Margo's form (``status.state``) or flat."""
    inner = status.get("status")
    if isinstance(inner, dict) and isinstance(inner.get("state"), str):
        return inner["state"]
    state = status.get("state")
    return state if isinstance(state, str) else None


def put_status(
    conn: StoreConnection,
    tenant: str,
    device_id: str,
    status: dict[str, Any],
    seq: int,
    now: float,
) -> bool:
    """Store the status unless a newer one is stored; ``NotFound`` for an unknown device,
    ``StatusRefused`` for a claim the device may not make (nothing is written)."""
    deployment_id = status_deployment_id(status)
    row = conn.execute(
        "SELECT seq, status FROM statuses WHERE tenant = ? AND device_id = ? AND deployment_id = ?",
        (tenant, device_id, deployment_id),
    ).fetchone()
    if row is None:
        require_device(conn, tenant, device_id)
    refusal = check_claim(conn, tenant, device_id, deployment_id, status)
    if refusal is not None:
        raise StatusRefused(refusal)
    if row is not None and seq <= row[0]:
        return False
    conn.execute(
        "INSERT INTO statuses (tenant, device_id, deployment_id, status, seq, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, device_id, deployment_id)"
        " DO UPDATE SET status = excluded.status, seq = excluded.seq,"
        " updated_at = excluded.updated_at",
        (tenant, device_id, deployment_id, dumps(status), seq, now),
    )
    previous = status_state(loads(row[1])) if row is not None else None
    state = status_state(status)
    if state != previous:
        add_event(
            conn,
            tenant,
            "deployment.status",
            device_id,
            {"deploymentId": deployment_id, "state": state, "previous": previous},
            now,
        )
    return True


def list_statuses(conn: StoreConnection, tenant: str, device_id: str | None) -> list[StatusRecord]:
    rows = per_deployment(
        conn,
        "tenant, device_id, deployment_id, status, seq, updated_at",
        "statuses",
        tenant,
        device_id,
    )
    return [StatusRecord(r[0], r[1], r[2], loads(r[3]), r[4], r[5]) for r in rows]


def _put_batch(
    conn: StoreConnection, items: Sequence[tuple[str, str, JsonDict, int]], now: float
) -> list[bool | StatusRefusal]:
    results: list[bool | StatusRefusal] = []
    for tenant, device_id, status, seq in items:
        try:
            results.append(put_status(conn, tenant, device_id, status, seq, now))
        except NotFound:
            results.append(False)
        except StatusRefused as exc:
            results.append(exc.refusal)
    return results


T = TypeVar("T")


def _logged(results: list[bool | StatusRefusal]) -> list[bool | StatusRefusal]:
    for result in results:
        if isinstance(result, StatusRefusal):
            log_refusal(result)
    return results


SMALL_STATUS_BATCH = 32  # batches of at most this many statuses may be written on the loop


class SqliteStatuses:
    """The status methods of ``Store``; ``SqliteStore`` inherits them and supplies the
    transactions (``_write``/``_read`` run a function of the connection on its thread)."""

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    async def _write_small(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    def _write_here(self, fn: Callable[..., T], *args: Any) -> T | Busy:
        raise NotImplementedError

    async def put_status_batch(
        self, items: Sequence[tuple[str, str, JsonDict, int]], *, now: float | None = None
    ) -> list[bool | StatusRefusal]:
        write = self._write_small if len(items) <= SMALL_STATUS_BATCH else self._write
        return _logged(await write(_put_batch, list(items), _now(now)))

    def put_status_batch_now(
        self, items: Sequence[tuple[str, str, JsonDict, int]], *, now: float | None = None
    ) -> list[bool | StatusRefusal] | None:
        """``put_status_batch`` done before returning, or ``None`` (nothing written) when it
        cannot be without waiting (``ports.ImmediateStatusWrites``)."""
        if len(items) > SMALL_STATUS_BATCH:
            return None
        results = self._write_here(_put_batch, list(items), _now(now))
        return None if isinstance(results, Busy) else _logged(results)

    async def put_status(
        self,
        tenant: str,
        device_id: str,
        status: JsonDict,
        seq: int,
        *,
        now: float | None = None,
    ) -> bool:
        try:
            return await self._write(put_status, tenant, device_id, status, seq, _now(now))
        except StatusRefused as exc:
            log_refusal(exc.refusal)
            raise

    async def put_statuses(
        self,
        tenant: str,
        device_id: str,
        items: Sequence[tuple[JsonDict, int]],
        *,
        now: float | None = None,
    ) -> int:
        when = _now(now)

        def run(conn: StoreConnection) -> int:
            return sum(
                put_status(conn, tenant, device_id, status, seq, when) for status, seq in items
            )

        if not items:
            return 0
        try:
            return await self._write(run)
        except StatusRefused as exc:
            log_refusal(exc.refusal)
            raise

    async def list_statuses(self, tenant: str, device_id: str | None = None) -> list[StatusRecord]:
        return await self._read(list_statuses, tenant, device_id)
