"""PostgreSQL store, part: telemetry records, the ack watermark and gaps.

Semantics as SQLite's (``controller.store.sqlite_telemetry``): records are idempotent by
``(tenant, device, seq)``; the watermark is the highest seq up to which every record is
stored or declared lost by a gap, starting from the device's first batch (or gap).

An ingest is **one statement** (one round trip, atomic by itself, no BEGIN/COMMIT):

- the batch is inserted as a multi-row insert from arrays. A batch of new records (the rule)
  is a plain insert; when the primary key refuses it (a retransmission after a reconnect) the
  statement fails whole, wrote nothing, and runs again with ``ON CONFLICT DO NOTHING``, which
  skips the seqs stored already (exactly once). ``ON CONFLICT`` costs a speculative insertion
  per row, about as much as the insert itself: only retransmissions pay for it;
- the bytes inserted are added to the tenant's usage shard (counted here for a new batch,
  from what ``ON CONFLICT`` really inserted otherwise): the count stays exact;
- the device's ``telemetry_state`` row is locked and moved by ``margo_telemetry_advance``
  (pg_schema), which walks the stored seqs and gaps in the server and counts the batch's own
  runs of consecutive seqs (computed here) as stored, since the statement cannot read back
  the rows it inserts.

The row lock serialises two ingests of the same device (two controllers during a failover).
The later one advances from the watermark the first committed, over what its own snapshot
shows: at worst it acks less than it could (the next batch catches up), never more, and the
watermark never moves back. Devices never wait for each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import asyncpg

from controller.store import pg_devices as devices
from controller.store.base import TelemetryRecord, TelemetryWriter
from controller.store.base import resolve_now as _now
from controller.store.pg_events import READ, STATEMENT, WRITE, Transactions, Tx, add_event
from controller.store.sqlite_telemetry import BoundTelemetryWriter

_MAX_SEQ = 2**63 - 1

# $1 tenant, $2 device, $3 watermark to start from for a device never seen, $4 received_at,
# $5 seqs, $6 streams, $7 payloads, $8/$9 the batch's runs of consecutive seqs (low, high),
# and for the first form $10 the batch's payload bytes.
_STATE = """
INSERT INTO telemetry_state AS s (tenant, device_id, watermark)
SELECT $1, $2, CASE
    WHEN EXISTS (SELECT 1 FROM telemetry_state WHERE tenant = $1 AND device_id = $2) THEN 0
    ELSE margo_telemetry_advance($1, $2, $3, $8::int8[], $9::int8[]) END
ON CONFLICT (tenant, device_id) DO UPDATE
    SET watermark = margo_telemetry_advance($1, $2, s.watermark, $8::int8[], $9::int8[])
RETURNING s.watermark
"""
_USAGE = """
INSERT INTO telemetry_usage AS u (tenant, shard, bytes)
SELECT $1, hashtext($2) & 63, n FROM total WHERE n > 0
ON CONFLICT (tenant, shard) DO UPDATE SET bytes = u.bytes + excluded.bytes
"""
_ROWS = (
    "SELECT $1, $2, q, st, $4, p FROM unnest($5::int8[], $6::text[], $7::bytea[]) AS r(q, st, p)"
)
_COLUMNS = "telemetry (tenant, device_id, seq, stream, received_at, payload)"

# A batch of new records (the rule): a plain insert, the bytes counted here.
_INGEST_NEW = f"""
WITH added AS (INSERT INTO {_COLUMNS} {_ROWS}),
total AS (SELECT $10::int8 AS n),
usage AS ({_USAGE})
{_STATE}
"""
# A batch with records stored already (a retransmission: the plain insert failed, and left
# nothing): those are skipped by the primary key, the bytes counted of what is inserted.
_INGEST_ANY = f"""
WITH added AS (
    INSERT INTO {_COLUMNS} {_ROWS}
    ON CONFLICT (tenant, device_id, seq) DO NOTHING
    RETURNING octet_length(payload) AS n
),
total AS (SELECT coalesce(sum(n), 0)::int8 AS n FROM added),
usage AS ({_USAGE})
{_STATE}
"""

# $1 tenant, $2 device, $3 watermark to start from for a device never seen (first - 1)
_ADVANCE = """
INSERT INTO telemetry_state AS s (tenant, device_id, watermark)
VALUES ($1, $2, margo_telemetry_advance($1, $2, $3, '{}', '{}'))
ON CONFLICT (tenant, device_id) DO UPDATE
    SET watermark = margo_telemetry_advance($1, $2, s.watermark, '{}', '{}')
RETURNING s.watermark
"""


def runs(seqs: Sequence[int]) -> tuple[list[int], list[int]]:
    """The runs of consecutive values in ``seqs`` as (lows, highs)."""
    lows: list[int] = []
    highs: list[int] = []
    for seq in sorted(set(seqs)):
        if highs and seq == highs[-1] + 1:
            highs[-1] = seq
        else:
            lows.append(seq)
            highs.append(seq)
    return lows, highs


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
    lows, highs = runs(seqs)
    args = (tenant, device_id, lows[0] - 1, now, seqs, streams, payloads, lows, highs)
    # idempotent (run again after a lost connection, it stores and counts nothing twice):
    # tx.writing stays False
    try:
        watermark = await tx.conn.fetchval(_INGEST_NEW, *args, sum(map(len, payloads)))
    except asyncpg.UniqueViolationError:
        watermark = await tx.conn.fetchval(_INGEST_ANY, *args)
    return int(watermark)


async def telemetry_watermark(tx: Tx, tenant: str, device_id: str) -> int:
    # 0 for a device never seen (no NotFound: a session asks before recording the connection)
    found = await tx.conn.fetchval(
        "SELECT watermark FROM telemetry_state WHERE tenant = $1 AND device_id = $2",
        tenant,
        device_id,
    )
    return int(found or 0)


async def record_gap(tx: Tx, tenant: str, device_id: str, first: int, last: int, now: float) -> int:
    """Remember the gap, append ``telemetry.gap``, advance (the caller's transaction)."""
    if first < 1 or last < first or last > _MAX_SEQ:
        raise ValueError(f"invalid telemetry gap {first}..{last}")
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
    add_event(
        tx,
        tenant,
        "telemetry.gap",
        device_id,
        {"first": first, "last": last, "count": last - first + 1},
        now,
    )
    return int(await tx.conn.fetchval(_ADVANCE, tenant, device_id, first - 1))


async def query_telemetry(
    tx: Tx,
    tenant: str,
    device_id: str,
    stream: str | None,
    since: float | None,
    limit: int,
    after_seq: int | None,
) -> list[TelemetryRecord]:
    await devices.require_device(tx, tenant, device_id)
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


class PgTelemetry(Transactions):
    """The telemetry methods of ``Store``; ``PgStore`` inherits them. Ingest and gaps share
    the pool's telemetry half (``_bulk``)."""

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
        return await self._bulk(
            STATEMENT, ingest_telemetry, tenant, device_id, list(records), _now(now)
        )

    async def telemetry_writer(self, tenant: str, device_id: str) -> TelemetryWriter:
        await self._read(devices.require_device, tenant, device_id)
        return BoundTelemetryWriter(
            partial(self.telemetry_watermark, tenant, device_id),
            partial(self._ingest, tenant, device_id, now=None),
            partial(self._record_gap, tenant, device_id, now=None),
        )

    async def telemetry_watermark(self, tenant: str, device_id: str) -> int:
        return await self._run(READ, telemetry_watermark, tenant, device_id)

    async def record_gap(
        self, tenant: str, device_id: str, first: int, last: int, *, now: float | None = None
    ) -> int:
        await self._read(devices.require_device, tenant, device_id)
        return await self._record_gap(tenant, device_id, first, last, now=now)

    async def _record_gap(
        self, tenant: str, device_id: str, first: int, last: int, *, now: float | None
    ) -> int:
        return await self._bulk(WRITE, record_gap, tenant, device_id, first, last, _now(now))

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
        return await self._read(query_telemetry, tenant, device_id, stream, since, limit, after_seq)
