"""SQLite store, part: devices. Runs on the worker thread inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from controller.labels import apply_changes, check_labels
from controller.store.base import DeviceRecord
from controller.store.sqlite_events import StoreConnection, add_event, dumps, loads
from margo_stream.errors import NotFound

_COLUMNS = (
    "tenant, device_id, capabilities, labels, connected, last_seen, first_seen,"
    " connection_count, manifest_version, stats, remote, reported_labels"
)


def device_not_found(device_id: str) -> NotFound:
    # The same words whether the device is missing or belongs to another tenant.
    return NotFound(f"device {device_id!r} not found")


def _record(row: tuple[Any, ...]) -> DeviceRecord:
    return DeviceRecord(
        tenant=row[0],
        device_id=row[1],
        capabilities=loads(row[2]),
        labels=loads(row[3]),
        connected=bool(row[4]),
        last_seen=row[5],
        first_seen=row[6],
        connection_count=row[7],
        manifest_version=row[8],
        stats=loads(row[9]),
        remote=row[10],
        reported_labels=loads(row[11]),
    )


def require_device(conn: StoreConnection, tenant: str, device_id: str) -> None:
    row = conn.execute(
        "SELECT 1 FROM devices WHERE tenant = ? AND device_id = ?", (tenant, device_id)
    ).fetchone()
    if row is None:
        raise device_not_found(device_id)


def get_device(conn: StoreConnection, tenant: str, device_id: str) -> DeviceRecord:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM devices WHERE tenant = ? AND device_id = ?", (tenant, device_id)
    ).fetchone()
    if row is None:
        raise device_not_found(device_id)
    return _record(row)


def list_devices(conn: StoreConnection, tenant: str) -> list[DeviceRecord]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM devices WHERE tenant = ? ORDER BY device_id", (tenant,)
    ).fetchall()
    return [_record(r) for r in rows]


def device_connected(
    conn: StoreConnection,
    tenant: str,
    device_id: str,
    capabilities: dict[str, Any],
    reported_labels: dict[str, str] | None,
    manifest_version: int | None,
    remote: str,
    now: float,
) -> DeviceRecord:
    # The device's claim replaces its reported labels (None: keep them); the operator's
    # ``labels`` are never written here.
    if reported_labels is None:
        row = conn.execute(
            "SELECT reported_labels FROM devices WHERE tenant = ? AND device_id = ?",
            (tenant, device_id),
        ).fetchone()
        reported_labels = loads(row[0]) if row else {}
    conn.execute(
        "INSERT INTO devices (tenant, device_id, capabilities, reported_labels, connected,"
        " last_seen, first_seen, connection_count, manifest_version, remote)"
        " VALUES (?, ?, ?, ?, 1, ?, ?, 1, ?, ?)"
        " ON CONFLICT (tenant, device_id) DO UPDATE SET"
        " capabilities = excluded.capabilities, reported_labels = excluded.reported_labels,"
        " connected = 1, last_seen = excluded.last_seen,"
        " connection_count = devices.connection_count + 1,"
        " manifest_version = excluded.manifest_version, remote = excluded.remote",
        (
            tenant,
            device_id,
            dumps(capabilities),
            dumps(reported_labels),
            now,
            now,
            manifest_version,
            remote,
        ),
    )
    record = get_device(conn, tenant, device_id)
    add_event(
        conn,
        tenant,
        "device.connected",
        device_id,
        {
            "remote": remote,
            "connectionCount": record.connection_count,
            "manifestVersion": manifest_version,
        },
        now,
    )
    return record


def device_disconnected(conn: StoreConnection, tenant: str, device_id: str, now: float) -> None:
    cur = conn.execute(
        "UPDATE devices SET connected = 0, last_seen = MAX(COALESCE(last_seen, 0), ?)"
        " WHERE tenant = ? AND device_id = ?",
        (now, tenant, device_id),
    )
    if cur.rowcount == 0:
        raise device_not_found(device_id)
    add_event(conn, tenant, "device.disconnected", device_id, {}, now)


def touch_devices(conn: StoreConnection, batch: Sequence[tuple[str, str, float]]) -> None:
    conn.executemany(
        "UPDATE devices SET last_seen = MAX(COALESCE(last_seen, 0), ?)"
        " WHERE tenant = ? AND device_id = ?",
        [(ts, tenant, device_id) for tenant, device_id, ts in batch],
    )


def mark_all_disconnected(conn: StoreConnection) -> int:
    return conn.execute("UPDATE devices SET connected = 0 WHERE connected != 0").rowcount


def set_labels(
    conn: StoreConnection, tenant: str, device_id: str, labels: dict[str, str], now: float
) -> None:
    check_labels(labels)
    cur = conn.execute(
        "UPDATE devices SET labels = ? WHERE tenant = ? AND device_id = ?",
        (dumps(labels), tenant, device_id),
    )
    if cur.rowcount == 0:
        raise device_not_found(device_id)
    add_event(conn, tenant, "device.labels", device_id, {"labels": labels}, now)


def update_labels(
    conn: StoreConnection,
    tenant: str,
    device_id: str,
    changes: dict[str, str | None],
    now: float,
) -> dict[str, str]:
    row = conn.execute(
        "SELECT labels FROM devices WHERE tenant = ? AND device_id = ?", (tenant, device_id)
    ).fetchone()
    if row is None:
        raise device_not_found(device_id)
    labels = apply_changes(loads(row[0]), changes)
    conn.execute(
        "UPDATE devices SET labels = ? WHERE tenant = ? AND device_id = ?",
        (dumps(labels), tenant, device_id),
    )
    add_event(conn, tenant, "device.labels", device_id, {"labels": labels}, now)
    return labels


def set_device_stats(
    conn: StoreConnection, tenant: str, device_id: str, stats: dict[str, Any]
) -> None:
    cur = conn.execute(
        "UPDATE devices SET stats = ? WHERE tenant = ? AND device_id = ?",
        (dumps(stats), tenant, device_id),
    )
    if cur.rowcount == 0:
        raise device_not_found(device_id)


def set_manifest_version(conn: StoreConnection, tenant: str, device_id: str, version: int) -> None:
    cur = conn.execute(
        "UPDATE devices SET manifest_version = ? WHERE tenant = ? AND device_id = ?",
        (version, tenant, device_id),
    )
    if cur.rowcount == 0:
        raise device_not_found(device_id)
