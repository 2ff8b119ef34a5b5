"""PostgreSQL store, part: devices. Runs inside the caller's transaction (a ``Tx``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from controller.labels import apply_changes, check_labels
from controller.store.base import DeviceRecord
from controller.store.pg_events import (
    EVENT_CHANNEL,
    EVENT_LOCK_CLASS,
    Tx,
    add_event,
    affected,
    locks_sql,
)
from controller.store.sqlite_devices import _COLUMNS as COLUMNS
from controller.store.sqlite_devices import _record, device_not_found
from controller.store.sqlite_events import dumps, loads


def record(row: asyncpg.Record | None) -> DeviceRecord:
    """A row of ``COLUMNS`` (SQLite's, in the same order) as the record."""
    assert row is not None
    return _record(tuple(row))


async def require_device(tx: Tx, tenant: str, device_id: str) -> None:
    found = await tx.conn.fetchval(
        "SELECT 1 FROM devices WHERE tenant = $1 AND device_id = $2", tenant, device_id
    )
    if found is None:
        raise device_not_found(device_id)


async def require_devices(tx: Tx, tenant: str, device_ids: Sequence[str]) -> None:
    """``NotFound`` naming the first of ``device_ids`` the tenant does not have."""
    if not device_ids:
        return
    rows = await tx.conn.fetch(
        "SELECT device_id FROM devices WHERE tenant = $1 AND device_id = ANY($2::text[])",
        tenant,
        list(dict.fromkeys(device_ids)),
    )
    known = {r[0] for r in rows}
    for device_id in device_ids:
        if device_id not in known:
            raise device_not_found(device_id)


async def get_device(tx: Tx, tenant: str, device_id: str) -> DeviceRecord:
    row = await tx.conn.fetchrow(
        f"SELECT {COLUMNS} FROM devices WHERE tenant = $1 AND device_id = $2", tenant, device_id
    )
    if row is None:
        raise device_not_found(device_id)
    return record(row)


async def list_devices(tx: Tx, tenant: str) -> list[DeviceRecord]:
    rows = await tx.conn.fetch(
        f"SELECT {COLUMNS} FROM devices WHERE tenant = $1 ORDER BY device_id", tenant
    )
    return [record(r) for r in rows]


# The device's row and its event in one statement ($8 event lock class, $9 channel).
_CONNECTED = f"""
WITH d AS (
    INSERT INTO devices (tenant, device_id, capabilities, reported_labels, connected,
        last_seen, first_seen, connection_count, manifest_version, remote)
    VALUES ($1, $2, $3, coalesce($4::text, '{{}}'), true, $5, $5, 1, $6, $7)
    ON CONFLICT (tenant, device_id) DO UPDATE SET
        capabilities = excluded.capabilities,
        reported_labels = coalesce($4::text, devices.reported_labels),
        connected = true, last_seen = excluded.last_seen,
        connection_count = devices.connection_count + 1,
        manifest_version = excluded.manifest_version, remote = excluded.remote
    RETURNING {COLUMNS}
), event AS (
    INSERT INTO events (tenant, ts, kind, device_id, payload)
    SELECT $1, $5, 'device.connected', $2, json_build_object(
        'remote', $7::text, 'connectionCount', d.connection_count,
        'manifestVersion', $6::int8)::text
    FROM d, {locks_sql("$8", "ARRAY[$1::text]", "$9", after="d")} WHERE l.n > 0
)
SELECT {COLUMNS} FROM d
"""

_DISCONNECTED = f"""
WITH d AS (
    UPDATE devices SET connected = false, last_seen = greatest(coalesce(last_seen, 0), $3)
    WHERE tenant = $1 AND device_id = $2 RETURNING device_id
), event AS (
    INSERT INTO events (tenant, ts, kind, device_id, payload)
    SELECT $1, $3, 'device.disconnected', $2, '{{}}'
    FROM d, {locks_sql("$4", "ARRAY[$1::text]", "$5", after="d")} WHERE l.n > 0
)
SELECT count(*) FROM d
"""


async def device_connected(
    tx: Tx,
    tenant: str,
    device_id: str,
    capabilities: dict[str, Any],
    reported_labels: dict[str, str] | None,
    manifest_version: int | None,
    remote: str,
    now: float,
) -> DeviceRecord:
    """One statement (``STATEMENT`` mode): the device's claim replaces its reported labels
    (None: keep them); the operator's ``labels`` are never written here."""
    tx.writing = True
    row = await tx.conn.fetchrow(
        _CONNECTED,
        tenant,
        device_id,
        dumps(capabilities),
        None if reported_labels is None else dumps(reported_labels),
        now,
        manifest_version,
        remote,
        EVENT_LOCK_CLASS,
        EVENT_CHANNEL,
    )
    tx.notified.add(tenant)
    return record(row)


async def device_disconnected(tx: Tx, tenant: str, device_id: str, now: float) -> None:
    """One statement (``STATEMENT`` mode)."""
    tx.writing = True
    found = await tx.conn.fetchval(
        _DISCONNECTED, tenant, device_id, now, EVENT_LOCK_CLASS, EVENT_CHANNEL
    )
    if not found:
        raise device_not_found(device_id)
    tx.notified.add(tenant)


async def touch_devices(tx: Tx, batch: Sequence[tuple[str, str, float]]) -> None:
    latest: dict[tuple[str, str], float] = {}
    for tenant, device_id, ts in batch:
        key = (tenant, device_id)
        latest[key] = max(ts, latest.get(key, ts))
    keys = sorted(latest)  # one lock order for concurrent touches
    await tx.conn.execute(
        "UPDATE devices d SET last_seen = greatest(coalesce(d.last_seen, 0), u.ts)"
        " FROM unnest($1::text[], $2::text[], $3::float8[]) AS u(t, id, ts)"
        " WHERE d.tenant = u.t AND d.device_id = u.id",
        [k[0] for k in keys],
        [k[1] for k in keys],
        [latest[k] for k in keys],
    )


async def mark_all_disconnected(tx: Tx) -> int:
    return affected(await tx.conn.execute("UPDATE devices SET connected = false WHERE connected"))


async def set_labels(
    tx: Tx, tenant: str, device_id: str, labels: dict[str, str], now: float
) -> None:
    check_labels(labels)
    await _set_column(tx, tenant, device_id, "labels", dumps(labels))
    add_event(tx, tenant, "device.labels", device_id, {"labels": labels}, now)


async def update_labels(
    tx: Tx, tenant: str, device_id: str, changes: dict[str, str | None], now: float
) -> dict[str, str]:
    current = await tx.conn.fetchval(
        "SELECT labels FROM devices WHERE tenant = $1 AND device_id = $2 FOR UPDATE",
        tenant,
        device_id,
    )
    if current is None:
        raise device_not_found(device_id)
    labels = apply_changes(loads(current), changes)
    await _set_column(tx, tenant, device_id, "labels", dumps(labels))
    add_event(tx, tenant, "device.labels", device_id, {"labels": labels}, now)
    return labels


async def _set_column(tx: Tx, tenant: str, device_id: str, column: str, value: object) -> None:
    status = await tx.conn.execute(
        f"UPDATE devices SET {column} = $3 WHERE tenant = $1 AND device_id = $2",
        tenant,
        device_id,
        value,
    )
    if not affected(status):
        raise device_not_found(device_id)


async def set_device_stats(tx: Tx, tenant: str, device_id: str, stats: dict[str, Any]) -> None:
    await _set_column(tx, tenant, device_id, "stats", dumps(stats))


async def set_manifest_version(tx: Tx, tenant: str, device_id: str, version: int) -> None:
    await _set_column(tx, tenant, device_id, "manifest_version", version)


async def set_manifest_versions(tx: Tx, items: Sequence[tuple[str, str, int]]) -> None:
    """Unknown devices are skipped; the last version given for a device wins."""
    last = {(tenant, device_id): version for tenant, device_id, version in items}
    keys = sorted(last)
    await tx.conn.execute(
        "UPDATE devices d SET manifest_version = u.v"
        " FROM unnest($1::text[], $2::text[], $3::int8[]) AS u(t, id, v)"
        " WHERE d.tenant = u.t AND d.device_id = u.id",
        [k[0] for k in keys],
        [k[1] for k in keys],
        [last[k] for k in keys],
    )
