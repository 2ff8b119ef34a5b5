"""SQLite store, part: the connection class, JSON helpers, the event feed and terminal audits.

Every function here runs on the store's worker thread inside a transaction the caller opened
(see ``controller.store.sqlite``); none of them commits.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from controller.store.base import EventRecord, SessionAudit
from margo_stream.errors import NotFound


class StoreConnection(sqlite3.Connection):
    """A connection that remembers which tenants got new events in the open transaction, so
    the store can wake event waiters after the commit (and not after a rollback)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new_event_tenants: set[str] = set()

    def take_event_tenants(self) -> set[str]:
        """The tenants with new events in the last committed transaction (then forgotten)."""
        tenants, self.new_event_tenants = self.new_event_tenants, set()
        return tenants


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def loads(text: str | None) -> Any:
    return {} if not text else json.loads(text)


def add_event(
    conn: StoreConnection,
    tenant: str,
    kind: str,
    device_id: str | None,
    payload: dict[str, Any] | None,
    now: float,
) -> int:
    cur = conn.execute(
        "INSERT INTO events (tenant, ts, kind, device_id, payload) VALUES (?, ?, ?, ?, ?)",
        (tenant, now, kind, device_id, dumps(payload or {})),
    )
    conn.new_event_tenants.add(tenant)
    return int(cur.lastrowid or 0)


def list_events(conn: StoreConnection, tenant: str, after_id: int, limit: int) -> list[EventRecord]:
    rows = conn.execute(
        "SELECT id, tenant, ts, kind, device_id, payload FROM events"
        " WHERE tenant = ? AND id > ? ORDER BY id LIMIT ?",
        (tenant, after_id, limit),
    ).fetchall()
    return [
        EventRecord(id=r[0], tenant=r[1], ts=r[2], kind=r[3], device_id=r[4], payload=loads(r[5]))
        for r in rows
    ]


def latest_event_id(conn: StoreConnection, tenant: str) -> int:
    row = conn.execute("SELECT MAX(id) FROM events WHERE tenant = ?", (tenant,)).fetchone()
    return int(row[0] or 0)


# -- terminal session audits -----------------------------------------------------------------

_AUDIT_COLUMNS = (
    "id, tenant, device_id, operator, command, started_at, ended_at, bytes_in, bytes_out, reason,"
    " exit_status"
)


def _audit(row: tuple[Any, ...]) -> SessionAudit:
    return SessionAudit(*row)


def start_session_audit(
    conn: StoreConnection,
    tenant: str,
    device_id: str,
    operator: str,
    command: str | None,
    now: float,
) -> int:
    cur = conn.execute(
        "INSERT INTO session_audits (tenant, device_id, operator, command, started_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (tenant, device_id, operator, command, now),
    )
    audit_id = int(cur.lastrowid or 0)
    add_event(
        conn,
        tenant,
        "terminal.opened",
        device_id,
        {"session": audit_id, "operator": operator, "command": command},
        now,
    )
    return audit_id


def finish_session_audit(
    conn: StoreConnection,
    audit_id: int,
    bytes_in: int,
    bytes_out: int,
    reason: str | None,
    now: float,
    tenant: str | None,
    exit_status: int | None = None,
    operator: str | None = None,
) -> None:
    row = conn.execute(
        "SELECT tenant, device_id, started_at FROM session_audits WHERE id = ?", (audit_id,)
    ).fetchone()
    if row is None or (tenant is not None and row[0] != tenant):
        raise NotFound(f"terminal session {audit_id} not found")
    conn.execute(
        "UPDATE session_audits SET ended_at = ?, bytes_in = ?, bytes_out = ?, reason = ?,"
        " exit_status = ? WHERE id = ?",
        (now, bytes_in, bytes_out, reason, exit_status, audit_id),
    )
    if operator is not None:  # the operator the device verified the grant of
        conn.execute("UPDATE session_audits SET operator = ? WHERE id = ?", (operator, audit_id))
    add_event(
        conn,
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


def list_session_audits(conn: StoreConnection, tenant: str, limit: int) -> list[SessionAudit]:
    rows = conn.execute(
        f"SELECT {_AUDIT_COLUMNS} FROM session_audits WHERE tenant = ? ORDER BY id DESC LIMIT ?",
        (tenant, limit),
    ).fetchall()
    return [_audit(r) for r in rows]
