"""PostgreSQL store, part: telemetry records, the ack watermark and gaps.

Semantics as SQLite's (``controller.store.sqlite_telemetry``): records are idempotent by
``(tenant, device, seq)``; the watermark is the highest seq up to which every record is
stored or declared lost by a gap, starting from the device's first batch (or gap).

An ingest is two statements in one transaction:

1. one statement that locks the device's ``telemetry_state`` row (created with the starting
   point on the first batch), inserts the whole batch as a multi-row insert from arrays with
   ``ON CONFLICT DO NOTHING`` (a retransmitted seq is skipped by the primary key: exactly
   once), and adds the bytes it really inserted to the tenant's usage shard: the tenant's
   count stays exact with retransmissions;
2. one that moves the watermark, walking the stored seqs and gaps in the server
   (``margo_telemetry_advance``), from the point the batch itself already proves contiguous.

The row lock of step 1 serialises two ingests of the same device (two controllers during a
failover), so the watermark never moves back; devices never wait for each other.
"""

from __future__ import annotations

from collections.abc import Sequence

from controller.store.base import TelemetryRecord
from controller.store.pg_events import Tx

_MAX_SEQ = 2**63 - 1

# $1 tenant, $2 device, $3 starting watermark for a device never seen, $4 received_at,
# $5 seqs, $6 streams, $7 payloads. Returns the stored watermark (locked).
_INGEST = """
WITH state AS (
    INSERT INTO telemetry_state AS s (tenant, device_id, watermark) VALUES ($1, $2, $3)
    ON CONFLICT (tenant, device_id) DO UPDATE SET watermark = s.watermark
    RETURNING s.watermark
), added AS (
    INSERT INTO telemetry (tenant, device_id, seq, stream, received_at, payload)
    SELECT $1, $2, q, st, $4, p FROM unnest($5::int8[], $6::text[], $7::bytea[]) AS r(q, st, p)
    ON CONFLICT (tenant, device_id, seq) DO NOTHING
    RETURNING octet_length(payload) AS n
), total AS (
    SELECT coalesce(sum(n), 0)::int8 AS n FROM added
), usage AS (
    INSERT INTO telemetry_usage AS u (tenant, shard, bytes)
    SELECT $1, hashtext($2) & 63, n FROM total WHERE n > 0
    ON CONFLICT (tenant, shard) DO UPDATE SET bytes = u.bytes + excluded.bytes
)
SELECT (SELECT watermark FROM state)
"""

_ADVANCE = (
    "UPDATE telemetry_state SET watermark = margo_telemetry_advance($1, $2, $3)"
    " WHERE tenant = $1 AND device_id = $2 RETURNING watermark"
)

_LOCK_STATE = (
    "INSERT INTO telemetry_state AS s (tenant, device_id, watermark) VALUES ($1, $2, $3)"
    " ON CONFLICT (tenant, device_id) DO UPDATE SET watermark = s.watermark"
    " RETURNING s.watermark"
)


def _contiguous_from(w: int, seqs: Sequence[int]) -> int:
    """The watermark ``w`` moved over the seqs of a batch that follow it without a hole (they
    are all stored now, inserted or already there)."""
    present = set(seqs)
    while w + 1 in present:
        w += 1
    return w


async def ingest_telemetry(
    tx: Tx, tenant: str, device_id: str, records: Sequence[tuple[int, str, bytes]], now: float
) -> int:
    seqs: list[int] = []
    streams: list[str] = []
    payloads: list[bytes] = []
    for seq, stream, payload in records:
        if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= _MAX_SEQ:
            raise ValueError(f"telemetry seq must be a positive integer, got {seq!r}")
        seqs.append(seq)
        streams.append(str(stream))
        payloads.append(bytes(payload))
    if not seqs:
        return await telemetry_watermark(tx, tenant, device_id)
    stored = int(
        await tx.conn.fetchval(
            _INGEST, tenant, device_id, min(seqs) - 1, now, seqs, streams, payloads
        )
    )
    return await _advance(tx, tenant, device_id, _contiguous_from(stored, seqs))


async def _advance(tx: Tx, tenant: str, device_id: str, w: int) -> int:
    return int(await tx.conn.fetchval(_ADVANCE, tenant, device_id, w))


async def telemetry_watermark(tx: Tx, tenant: str, device_id: str) -> int:
    # 0 for a device never seen (no NotFound: a session asks before recording the connection)
    found = await tx.conn.fetchval(
        "SELECT watermark FROM telemetry_state WHERE tenant = $1 AND device_id = $2",
        tenant,
        device_id,
    )
    return int(found or 0)


async def record_gap(tx: Tx, tenant: str, device_id: str, first: int, last: int, now: float) -> int:
    if first < 1 or last < first or last > _MAX_SEQ:
        raise ValueError(f"invalid telemetry gap {first}..{last}")
    stored = int(await tx.conn.fetchval(_LOCK_STATE, tenant, device_id, first - 1))
    await tx.conn.execute(
        "INSERT INTO telemetry_gaps AS g (tenant, device_id, first, last, recorded_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, device_id, first)"
        " DO UPDATE SET last = greatest(g.last, excluded.last)",
        tenant,
        device_id,
        first,
        last,
        now,
    )
    return await _advance(tx, tenant, device_id, stored)


async def query_telemetry(
    tx: Tx,
    tenant: str,
    device_id: str,
    stream: str | None,
    since: float | None,
    limit: int,
    after_seq: int | None,
) -> list[TelemetryRecord]:
    where = ["tenant = $1", "device_id = $2"]
    args: list[object] = [tenant, device_id]
    for column, op, value in (
        ("stream", "=", stream),
        ("received_at", ">=", since),
        ("seq", ">", after_seq),
    ):
        if value is not None:
            args.append(value)
            where.append(f"{column} {op} ${len(args)}")
    newest = since is None and after_seq is None
    args.append(max(0, limit))
    rows = await tx.conn.fetch(
        "SELECT tenant, device_id, seq, stream, received_at, payload FROM telemetry"
        f" WHERE {' AND '.join(where)} ORDER BY seq {'DESC' if newest else 'ASC'}"
        f" LIMIT ${len(args)}",
        *args,
    )
    records = [TelemetryRecord(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows]
    if newest:
        records.reverse()
    return records
