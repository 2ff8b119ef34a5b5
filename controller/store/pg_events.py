"""PostgreSQL store, part: the transaction handle, the event feed and terminal audits.

Every function here runs inside a transaction the caller opened (see ``controller.store.pg``)
on the connection of a ``Tx``; none of them commits.

Event ids are a cursor: a reader that has seen id ``n`` of a tenant asks for ids above ``n``,
so ids of one tenant must become visible in increasing order. A sequence alone does not give
that when transactions run side by side (a later id can commit first, and a reader past it
never sees the earlier one). So events are not inserted where they happen: ``add_event``
queues them on the ``Tx`` and ``flush_events`` inserts them at the end of the transaction,
holding a transaction-scoped advisory lock per tenant (``EVENT_LOCK_CLASS``, hash of the
tenant) until the commit: one tenant's events are numbered and committed in the same order,
while the rest of each transaction, and other tenants, run in parallel. The same flush sends
``NOTIFY margo_events, '<tenant>'`` (delivered at the commit, to every controller on the
database), which wakes ``wait_events`` callers everywhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg

from controller.store.base import EventRecord, SessionAudit
from controller.store.sqlite_events import dumps, loads
from margo_stream.errors import NotFound

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

T = TypeVar("T")

EVENT_CHANNEL = "margo_events"
EVENT_LOCK_CLASS = 0x6D617267  # "marg": first key of pg_advisory_xact_lock(int, int)


class Tx:
    """One transaction: its connection and the events it will append at the commit."""

    __slots__ = ("conn", "events", "notified", "writing")

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.events: list[tuple[str, float, str, str | None, str]] = []
        self.notified: set[str] = set()  # tenants whose events this transaction appended
        self.writing = False  # STATEMENT mode: the write was sent (its outcome is unknown)


READ, WRITE, STATEMENT = "read", "write", "statement"


class Transactions:
    """What the ``Store`` mixins of the ``pg_*`` modules need of ``PgStore``, which has them:
    run a coroutine function of a ``Tx`` (``_run``, ``_bulk``: at most half the pool at once)
    in one of three modes: ``WRITE`` in a transaction (the events it queued are appended
    before the commit); ``READ`` on its own; ``STATEMENT`` on its own too, for a write done
    in one statement (atomic by itself: no BEGIN and COMMIT round trips), which sets
    ``tx.writing`` before it unless running it twice does no harm (what failed before it,
    or an idempotent statement, may be run again after a lost connection)."""

    async def _run(self, mode: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        raise NotImplementedError

    async def _bulk(self, mode: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        raise NotImplementedError

    async def _write(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await self._run(WRITE, fn, *args)

    async def _read(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await self._run(READ, fn, *args)


def affected(status: str) -> int:
    """The row count of a command status (``"DELETE 3"`` -> 3)."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def add_event(
    tx: Tx,
    tenant: str,
    kind: str,
    device_id: str | None,
    payload: dict[str, Any] | None,
    now: float,
) -> None:
    tx.events.append((tenant, now, kind, device_id, dumps(payload or {})))


def locks_sql(lock_class: str, tenants: str, channel: str, after: str | None = None) -> str:
    """A FROM item ``l`` of one row (``l.n > 0``) that takes the event locks of the tenants
    of the ``text[]`` expression ``tenants`` and queues their notifications (volatile calls:
    always evaluated). It is an aggregate: complete before it yields its row, so before a
    statement that joins it draws an event id. ``after`` names a ``WITH`` query (with
    ``RETURNING``) of the same statement that must be done first: a statement writes its rows
    before it takes the locks, as a transaction flushes its events last, so a writer never
    waits for a row while it holds an event lock another writer of that row waits for."""
    if after is not None:
        tenants = f"CASE WHEN (SELECT count(*) FROM {after}) >= 0 THEN {tenants} END"
    return (
        f"(SELECT count(*) AS n FROM (SELECT pg_advisory_xact_lock({lock_class}, hashtext(x)),"
        f" pg_notify({channel}, x) FROM unnest({tenants}) AS x) AS locks) AS l"
    )


def events_sql(first: int, after: str | None = None) -> str:
    """The statement appending events: one round trip, its 8 parameters numbered from
    ``$first`` (``take_events``). A statement that writes other rows too puts them in a
    ``WITH`` query before it, named by ``after`` (one atomic statement)."""
    p = [f"${first + i}" for i in range(8)]
    return f"""
INSERT INTO events (tenant, ts, kind, device_id, payload)
SELECT e.t, e.ts, e.k, e.d, e.p
FROM {locks_sql(p[0], f"{p[1]}::text[]", p[2], after)},
     unnest({p[3]}::text[], {p[4]}::float8[], {p[5]}::text[], {p[6]}::text[], {p[7]}::text[])
        WITH ORDINALITY AS e(t, ts, k, d, p, n)
WHERE l.n > 0
ORDER BY e.n
RETURNING id
"""


_FLUSH = events_sql(1)


def take_events(tx: Tx) -> list[object]:
    """The queued events, taken off ``tx``, as the arguments of ``events_sql``."""
    queued, tx.events = tx.events, []
    tenants = sorted({e[0] for e in queued})  # one lock order everywhere: no deadlock
    tx.notified.update(tenants)
    return [
        EVENT_LOCK_CLASS,
        tenants,
        EVENT_CHANNEL,
        *([e[i] for e in queued] for i in range(5)),
    ]


async def flush_events(tx: Tx) -> list[int]:
    """Append the queued events (in the caller's transaction); their ids in order."""
    if not tx.events:
        return []
    rows = await tx.conn.fetch(_FLUSH, *take_events(tx))
    return sorted(int(r[0]) for r in rows)


async def add_event_now(
    tx: Tx,
    tenant: str,
    kind: str,
    device_id: str | None,
    payload: dict[str, Any] | None,
    now: float,
) -> int:
    """``add_event`` for a transaction that must return the event's id."""
    add_event(tx, tenant, kind, device_id, payload, now)
    return (await flush_events(tx))[-1]


async def list_events(tx: Tx, tenant: str, after_id: int, limit: int) -> list[EventRecord]:
    rows = await tx.conn.fetch(
        "SELECT id, tenant, ts, kind, device_id, payload FROM events"
        " WHERE tenant = $1 AND id > $2 ORDER BY id LIMIT $3",
        tenant,
        after_id,
        max(0, limit),
    )
    return [
        EventRecord(id=r[0], tenant=r[1], ts=r[2], kind=r[3], device_id=r[4], payload=loads(r[5]))
        for r in rows
    ]


async def latest_event_id(tx: Tx, tenant: str) -> int:
    return int(await tx.conn.fetchval("SELECT max(id) FROM events WHERE tenant = $1", tenant) or 0)


# -- terminal session audits -----------------------------------------------------------------

_AUDIT_COLUMNS = (
    "id, tenant, device_id, operator, command, started_at, ended_at, bytes_in, bytes_out, reason,"
    " exit_status"
)


async def start_session_audit(
    tx: Tx, tenant: str, device_id: str, operator: str, command: str | None, now: float
) -> int:
    audit_id = int(
        await tx.conn.fetchval(
            "INSERT INTO session_audits (tenant, device_id, operator, command, started_at)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING id",
            tenant,
            device_id,
            operator,
            command,
            now,
        )
    )
    add_event(
        tx,
        tenant,
        "terminal.opened",
        device_id,
        {"session": audit_id, "operator": operator, "command": command},
        now,
    )
    return audit_id


async def finish_session_audit(
    tx: Tx,
    audit_id: int,
    bytes_in: int,
    bytes_out: int,
    reason: str | None,
    now: float,
    tenant: str | None,
    exit_status: int | None,
    operator: str | None,
) -> None:
    row = await tx.conn.fetchrow(
        "UPDATE session_audits SET ended_at = $2, bytes_in = $3, bytes_out = $4, reason = $5,"
        " exit_status = $6, operator = coalesce($7, operator)"
        " WHERE id = $1 AND ($8::text IS NULL OR tenant = $8)"
        " RETURNING tenant, device_id, started_at",
        audit_id,
        now,
        bytes_in,
        bytes_out,
        reason,
        exit_status,
        operator,  # the operator the device verified the grant of
        tenant,
    )
    if row is None:
        raise NotFound(f"terminal session {audit_id} not found")
    add_event(
        tx,
        row[0],
        "terminal.closed",
        row[1],
        {
            "session": audit_id,
            "reason": reason,
            "exitStatus": exit_status,
            "bytesIn": bytes_in,
            "bytesOut": bytes_out,
            "seconds": round(now - row[2], 3),
        },
        now,
    )


async def list_session_audits(tx: Tx, tenant: str, limit: int) -> list[SessionAudit]:
    rows = await tx.conn.fetch(
        f"SELECT {_AUDIT_COLUMNS} FROM session_audits WHERE tenant = $1 ORDER BY id DESC LIMIT $2",
        tenant,
        max(0, limit),
    )
    return [SessionAudit(*r) for r in rows]
