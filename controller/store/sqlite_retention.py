"""SQLite store, part: retention, the deletion of old telemetry, events and terminal audits.

Every function deletes at most ``limit`` rows, in the caller's transaction (one per call), so
the retention task (``controller.retention``) works through a backlog in small transactions
and the writers it shares a thread with (telemetry ingest on the telemetry database, the
control plane on the main one) wait for one batch at most. Telemetry is found by the index
``(tenant, received_at)``, oldest first; every deletion subtracts its payload bytes from the
tenant's ``telemetry_usage`` (which ingest adds to), so the size cap is checked without
summing the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from controller.store.sqlite_events import StoreConnection
from controller.store.sqlite_telemetry import add_usage

T = TypeVar("T")

# -- telemetry (the telemetry database) ------------------------------------------------------


def telemetry_usage(conn: StoreConnection) -> dict[str, int]:
    rows = conn.execute("SELECT tenant, bytes FROM telemetry_usage ORDER BY tenant").fetchall()
    return {tenant: int(n) for tenant, n in rows}


def _delete(conn: StoreConnection, tenant: str, victims: list[tuple[int, int]]) -> tuple[int, int]:
    """Delete telemetry rows by rowid; ``(records, bytes)`` deleted."""
    if not victims:
        return 0, 0
    conn.executemany("DELETE FROM telemetry WHERE rowid = ?", [(rowid,) for rowid, _ in victims])
    freed = sum(int(n or 0) for _, n in victims)
    add_usage(conn, tenant, -freed)
    return len(victims), freed


def prune_telemetry_before(
    conn: StoreConnection, before: float, limit: int, tenant: str | None
) -> tuple[int, int]:
    """Delete up to ``limit`` records received before ``before`` (of one tenant, or of all),
    oldest first per tenant; returns ``(records, bytes)``."""
    if tenant is None:
        tenants = [r[0] for r in conn.execute("SELECT tenant FROM telemetry_usage").fetchall()]
    else:
        tenants = [tenant]
    records = freed = 0
    for t in tenants:
        if records >= limit:
            break
        victims = conn.execute(
            "SELECT rowid, length(payload) FROM telemetry WHERE tenant = ? AND received_at < ?"
            " ORDER BY received_at LIMIT ?",
            (t, before, limit - records),
        ).fetchall()
        n, b = _delete(conn, t, victims)
        records, freed = records + n, freed + b
    return records, freed


def prune_telemetry_over(
    conn: StoreConnection, tenant: str, max_bytes: int, limit: int
) -> tuple[int, int]:
    """Delete the tenant's oldest records until its payloads take at most ``max_bytes`` (at
    most ``limit`` records in this call); returns ``(records, bytes)``."""
    row = conn.execute("SELECT bytes FROM telemetry_usage WHERE tenant = ?", (tenant,)).fetchone()
    excess = (int(row[0]) if row is not None else 0) - max_bytes
    if excess <= 0:
        return 0, 0
    candidates = conn.execute(
        "SELECT rowid, length(payload) FROM telemetry WHERE tenant = ?"
        " ORDER BY received_at LIMIT ?",
        (tenant, limit),
    ).fetchall()
    victims: list[tuple[int, int]] = []
    covered = 0
    for rowid, n in candidates:
        if covered >= excess:
            break
        victims.append((rowid, n))
        covered += int(n or 0)
    result = _delete(conn, tenant, victims)
    if len(candidates) < limit and covered < excess:
        # Fewer bytes stored than counted (the count can only drift by a crash between the
        # two databases' views, never in one transaction): take the real figure.
        actual = conn.execute(
            "SELECT COALESCE(SUM(length(payload)), 0) FROM telemetry WHERE tenant = ?", (tenant,)
        ).fetchone()[0]
        conn.execute("UPDATE telemetry_usage SET bytes = ? WHERE tenant = ?", (int(actual), tenant))
    return result


def prune_telemetry_gaps(conn: StoreConnection, before: float, limit: int) -> int:
    """Forget up to ``limit`` gaps recorded before ``before`` that the device's watermark has
    passed (a gap the watermark still needs is kept)."""
    return conn.execute(
        "DELETE FROM telemetry_gaps WHERE (tenant, device_id, first) IN ("
        " SELECT g.tenant, g.device_id, g.first FROM telemetry_gaps g"
        " JOIN telemetry_state s ON s.tenant = g.tenant AND s.device_id = g.device_id"
        " WHERE g.recorded_at < ? AND g.last <= s.watermark LIMIT ?)",
        (before, limit),
    ).rowcount


# -- the main database -----------------------------------------------------------------------


def prune_events(conn: StoreConnection, before: float, limit: int) -> int:
    """Delete up to ``limit`` events older than ``before`` (ids are never reused: cursors of
    event-feed readers stay valid)."""
    return conn.execute(
        "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE ts < ? ORDER BY ts LIMIT ?)",
        (before, limit),
    ).rowcount


def prune_session_audits(conn: StoreConnection, before: float, limit: int) -> int:
    """Delete up to ``limit`` terminal session audits that ended before ``before`` (sessions
    still open are kept whatever their age)."""
    return conn.execute(
        "DELETE FROM session_audits WHERE id IN (SELECT id FROM session_audits"
        " WHERE ended_at < ? ORDER BY ended_at LIMIT ?)",
        (before, limit),
    ).rowcount


class _Transactions(Protocol):
    async def _write(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def _read(self, fn: Callable[..., T], *args: Any) -> T: ...


class SqliteRetention:
    """The retention methods (``controller.retention.RetentionStore``); ``SqliteStore``
    inherits them and supplies the transactions of both databases."""

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    @property
    def _telemetry(self) -> _Transactions:
        raise NotImplementedError

    async def telemetry_usage(self) -> dict[str, int]:
        return await self._telemetry._read(telemetry_usage)

    async def prune_telemetry_before(
        self, before: float, *, limit: int, tenant: str | None = None
    ) -> tuple[int, int]:
        return await self._telemetry._write(prune_telemetry_before, before, limit, tenant)

    async def prune_telemetry_over(
        self, tenant: str, max_bytes: int, *, limit: int
    ) -> tuple[int, int]:
        return await self._telemetry._write(prune_telemetry_over, tenant, max_bytes, limit)

    async def prune_telemetry_gaps(self, before: float, *, limit: int) -> int:
        return await self._telemetry._write(prune_telemetry_gaps, before, limit)

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
