"""PostgreSQL store, part: retention (``controller.retention.RetentionStore``).

Every function deletes at most ``limit`` rows in the caller's transaction, as SQLite's
(``controller.store.sqlite_retention``). Telemetry victims are found by the index ``(tenant,
received_at)``, oldest first; each deletion returns what it really deleted (``RETURNING``:
two controllers pruning at once delete each row once) and subtracts those bytes from the
tenant's usage shards in the same statement, so ``telemetry_usage`` stays exact without
summing the table.
"""

from __future__ import annotations

from controller.store.pg_events import Transactions, Tx, affected

# $1 tenant; victims: the CTE ``v`` of (device_id, seq). Returns (records, bytes).
_DELETE_VICTIMS = """
, gone AS (
    DELETE FROM telemetry t USING v
    WHERE t.tenant = $1 AND t.device_id = v.device_id AND t.seq = v.seq
    RETURNING t.device_id, octet_length(t.payload) AS n
), per_shard AS (
    SELECT hashtext(device_id) & 63 AS shard, sum(n)::int8 AS n, count(*) AS c
    FROM gone GROUP BY 1
), usage AS (
    UPDATE telemetry_usage u SET bytes = u.bytes - p.n
    FROM per_shard p WHERE u.tenant = $1 AND u.shard = p.shard
)
SELECT coalesce(sum(c), 0)::int8, coalesce(sum(n), 0)::int8 FROM per_shard
"""


async def telemetry_usage(tx: Tx) -> dict[str, int]:
    rows = await tx.conn.fetch(
        "SELECT tenant, greatest(sum(bytes), 0)::int8 FROM telemetry_usage"
        " GROUP BY tenant ORDER BY tenant"
    )
    return {r[0]: int(r[1]) for r in rows}


async def _delete_before(tx: Tx, tenant: str, before: float, limit: int) -> tuple[int, int]:
    row = await tx.conn.fetchrow(
        "WITH v AS (SELECT device_id, seq FROM telemetry WHERE tenant = $1 AND received_at < $2"
        " ORDER BY received_at, device_id, seq LIMIT $3)" + _DELETE_VICTIMS,
        tenant,
        before,
        limit,
    )
    assert row is not None
    return int(row[0]), int(row[1])


async def prune_telemetry_before(
    tx: Tx, before: float, limit: int, tenant: str | None
) -> tuple[int, int]:
    """Delete up to ``limit`` records received before ``before`` (of one tenant, or of all),
    oldest first per tenant; returns ``(records, bytes)``."""
    if tenant is None:
        tenants = [r[0] for r in await tx.conn.fetch("SELECT DISTINCT tenant FROM telemetry_usage")]
    else:
        tenants = [tenant]
    records = freed = 0
    for t in sorted(tenants):
        if records >= limit:
            break
        n, b = await _delete_before(tx, t, before, limit - records)
        records, freed = records + n, freed + b
    return records, freed


async def prune_telemetry_over(tx: Tx, tenant: str, max_bytes: int, limit: int) -> tuple[int, int]:
    """Delete the tenant's oldest records until its payloads take at most ``max_bytes`` (at
    most ``limit`` records in this call); returns ``(records, bytes)``."""
    used = await tx.conn.fetchval(
        "SELECT coalesce(sum(bytes), 0)::int8 FROM telemetry_usage WHERE tenant = $1", tenant
    )
    excess = int(used) - max_bytes
    if excess <= 0:
        return 0, 0
    # the oldest records whose bytes, counted before each, are still short of the excess
    row = await tx.conn.fetchrow(
        "WITH c AS (SELECT device_id, seq, sum(octet_length(payload))"
        "  OVER (ORDER BY received_at, device_id, seq ROWS UNBOUNDED PRECEDING)"
        "  - octet_length(payload) AS before FROM ("
        "   SELECT device_id, seq, received_at, payload FROM telemetry WHERE tenant = $1"
        "   ORDER BY received_at, device_id, seq LIMIT $2) AS oldest),"
        " v AS (SELECT device_id, seq FROM c WHERE before < $3)" + _DELETE_VICTIMS,
        tenant,
        limit,
        excess,
    )
    assert row is not None
    return int(row[0]), int(row[1])


async def prune_telemetry_gaps(tx: Tx, before: float, limit: int) -> int:
    """Forget up to ``limit`` gaps recorded before ``before`` that the device's watermark has
    passed (a gap the watermark still needs is kept)."""
    return affected(
        await tx.conn.execute(
            "DELETE FROM telemetry_gaps WHERE (tenant, device_id, first) IN ("
            " SELECT g.tenant, g.device_id, g.first FROM telemetry_gaps g"
            " JOIN telemetry_state s ON s.tenant = g.tenant AND s.device_id = g.device_id"
            " WHERE g.recorded_at < $1 AND g.last <= s.watermark LIMIT $2)",
            before,
            limit,
        )
    )


async def prune_events(tx: Tx, before: float, limit: int) -> int:
    """Delete up to ``limit`` events older than ``before`` (ids are never reused: cursors of
    event-feed readers stay valid)."""
    return affected(
        await tx.conn.execute(
            "DELETE FROM events WHERE id IN"
            " (SELECT id FROM events WHERE ts < $1 ORDER BY ts LIMIT $2)",
            before,
            limit,
        )
    )


async def prune_session_audits(tx: Tx, before: float, limit: int) -> int:
    """Delete up to ``limit`` terminal session audits that ended before ``before`` (sessions
    still open are kept whatever their age)."""
    return affected(
        await tx.conn.execute(
            "DELETE FROM session_audits WHERE id IN (SELECT id FROM session_audits"
            " WHERE ended_at < $1 ORDER BY ended_at LIMIT $2)",
            before,
            limit,
        )
    )


class PgRetention(Transactions):
    """The retention methods; ``PgStore`` inherits them and supplies the transactions."""

    async def telemetry_usage(self) -> dict[str, int]:
        return await self._read(telemetry_usage)

    async def prune_telemetry_before(
        self, before: float, *, limit: int, tenant: str | None = None
    ) -> tuple[int, int]:
        return await self._write(prune_telemetry_before, before, limit, tenant)

    async def prune_telemetry_over(
        self, tenant: str, max_bytes: int, *, limit: int
    ) -> tuple[int, int]:
        return await self._write(prune_telemetry_over, tenant, max_bytes, limit)

    async def prune_telemetry_gaps(self, before: float, *, limit: int) -> int:
        return await self._write(prune_telemetry_gaps, before, limit)

    async def prune_telemetry(self, tenant: str, before: float) -> int:
        total = 0
        while True:
            n, _ = await self.prune_telemetry_before(before, limit=5000, tenant=tenant)
            total += n
            if n < 5000:
                return total

    async def prune_events(self, before: float, *, limit: int) -> int:
        return await self._write(prune_events, before, limit)

    async def prune_session_audits(self, before: float, *, limit: int) -> int:
        return await self._write(prune_session_audits, before, limit)
