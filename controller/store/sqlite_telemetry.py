"""SQLite store, part: telemetry records, the ack watermark and gaps.

The watermark of a device is the highest seq ``w`` such that every seq from the device's first
known seq up to ``w`` is either stored or declared lost by a gap; the controller acks ``w`` and
the agent may then drop everything up to it. A device's first batch (or first gap) sets the
starting point, so an agent whose buffer was trimmed before it ever reached this controller is
not stuck waiting for records nobody has. Runs on the telemetry database's own worker thread
inside the caller's transaction; the main store checks the device and records gap events.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence

from controller.store.base import TelemetryRecord
from controller.store.sqlite_events import StoreConnection

_WALK_CHUNK = 1024


def _stored_watermark(conn: StoreConnection, tenant: str, device_id: str) -> int | None:
    row = conn.execute(
        "SELECT watermark FROM telemetry_state WHERE tenant = ? AND device_id = ?",
        (tenant, device_id),
    ).fetchone()
    return None if row is None else int(row[0])


def _advance(conn: StoreConnection, tenant: str, device_id: str, w: int) -> int:
    while True:
        rows = conn.execute(
            "SELECT seq FROM telemetry WHERE tenant = ? AND device_id = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (tenant, device_id, w, _WALK_CHUNK),
        ).fetchall()
        for (seq,) in rows:
            if seq != w + 1:
                break
            w = seq
        else:
            if len(rows) == _WALK_CHUNK:
                continue  # the whole chunk was contiguous: look further
        gap = conn.execute(
            "SELECT MAX(last) FROM telemetry_gaps"
            " WHERE tenant = ? AND device_id = ? AND first <= ? AND last > ?",
            (tenant, device_id, w + 1, w),
        ).fetchone()
        if gap is None or gap[0] is None:
            return w
        w = int(gap[0])


def _save_watermark(
    conn: StoreConnection, tenant: str, device_id: str, start: int | None, w: int
) -> None:
    if start == w:
        return
    conn.execute(
        "INSERT INTO telemetry_state (tenant, device_id, watermark) VALUES (?, ?, ?)"
        " ON CONFLICT (tenant, device_id) DO UPDATE SET watermark = excluded.watermark",
        (tenant, device_id, w),
    )


_INSERT = (
    "INSERT INTO telemetry (tenant, device_id, seq, stream, received_at, payload)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_NEW = _INSERT.replace("INSERT", "INSERT OR IGNORE", 1)


def _insert(conn: StoreConnection, rows: list[tuple[str, str, int, str, float, bytes]]) -> int:
    """Insert the rows not stored yet; returns the payload bytes added. A batch without
    duplicates (the rule) is one ``executemany``; a retransmission falls back to row by row,
    so the tenant's byte count stays exact."""
    conn.execute("SAVEPOINT telemetry_batch")
    try:
        conn.executemany(_INSERT, rows)
    except sqlite3.IntegrityError:
        conn.execute("ROLLBACK TO telemetry_batch")
        added = 0
        for row in rows:
            if conn.execute(_INSERT_NEW, row).rowcount:
                added += len(row[5])
        return added
    finally:
        conn.execute("RELEASE telemetry_batch")
    return sum(len(r[5]) for r in rows)


def add_usage(conn: StoreConnection, tenant: str, delta: int) -> None:
    """The tenant's payload bytes (``telemetry_usage``) change by ``delta``."""
    if delta:
        conn.execute(
            "INSERT INTO telemetry_usage (tenant, bytes) VALUES (?, ?)"
            " ON CONFLICT (tenant) DO UPDATE SET bytes = MAX(0, bytes + excluded.bytes)",
            (tenant, delta),
        )


def ingest_telemetry(
    conn: StoreConnection,
    tenant: str,
    device_id: str,
    records: Sequence[tuple[int, str, bytes]],
    now: float,
) -> int:
    rows = []
    for seq, stream, payload in records:
        if not isinstance(seq, int) or seq < 1:
            raise ValueError(f"telemetry seq must be a positive integer, got {seq!r}")
        rows.append((tenant, device_id, seq, str(stream), now, bytes(payload)))
    stored = _stored_watermark(conn, tenant, device_id)
    if not rows:
        return stored or 0
    add_usage(conn, tenant, _insert(conn, rows))
    start = stored if stored is not None else min(r[2] for r in rows) - 1
    w = _advance(conn, tenant, device_id, start)
    _save_watermark(conn, tenant, device_id, stored, w)
    return w


def telemetry_watermark(conn: StoreConnection, tenant: str, device_id: str) -> int:
    # No NotFound for a device never seen: a session asks before recording the connection,
    # and 0 tells nothing about other tenants.
    return _stored_watermark(conn, tenant, device_id) or 0


def record_gap(
    conn: StoreConnection, tenant: str, device_id: str, first: int, last: int, now: float
) -> int:
    if first < 1 or last < first:
        raise ValueError(f"invalid telemetry gap {first}..{last}")
    conn.execute(
        "INSERT INTO telemetry_gaps (tenant, device_id, first, last, recorded_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, device_id, first)"
        " DO UPDATE SET last = MAX(last, excluded.last)",
        (tenant, device_id, first, last, now),
    )
    stored = _stored_watermark(conn, tenant, device_id)
    start = stored if stored is not None else first - 1
    w = _advance(conn, tenant, device_id, start)
    _save_watermark(conn, tenant, device_id, stored, w)
    return w


def query_telemetry(
    conn: StoreConnection,
    tenant: str,
    device_id: str,
    stream: str | None,
    since: float | None,
    limit: int,
    after_seq: int | None,
) -> list[TelemetryRecord]:
    where = ["tenant = ?", "device_id = ?"]
    args: list[object] = [tenant, device_id]
    if stream is not None:
        where.append("stream = ?")
        args.append(stream)
    if since is not None:
        where.append("received_at >= ?")
        args.append(since)
    if after_seq is not None:
        where.append("seq > ?")
        args.append(after_seq)
    newest = since is None and after_seq is None
    order = "DESC" if newest else "ASC"
    rows = conn.execute(
        "SELECT tenant, device_id, seq, stream, received_at, payload FROM telemetry"
        f" WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?",
        (*args, max(0, limit)),
    ).fetchall()
    if newest:
        rows.reverse()
    return [TelemetryRecord(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows]


class BoundTelemetryWriter:
    """``TelemetryWriter`` over one device's store calls, bound once its record was checked."""

    __slots__ = ("_watermark", "_ingest", "_record_gap")

    def __init__(
        self,
        watermark: Callable[[], Awaitable[int]],
        ingest: Callable[[Sequence[tuple[int, str, bytes]]], Awaitable[int]],
        record_gap: Callable[[int, int], Awaitable[int]],
    ) -> None:
        self._watermark = watermark
        self._ingest = ingest
        self._record_gap = record_gap

    async def watermark(self) -> int:
        return await self._watermark()

    async def ingest(self, records: Sequence[tuple[int, str, bytes]]) -> int:
        return await self._ingest(records)

    async def record_gap(self, first: int, last: int) -> int:
        return await self._record_gap(first, last)
