"""SQLite store, part: rollouts (table ``rollouts``; ``controller.store.rollouts`` says what
each method promises). Runs on the worker thread inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from controller.store.base import resolve_now as _now
from controller.store.rollouts import (
    ACTIVE_PHASES,
    JsonDict,
    RolloutConflict,
    RolloutEvent,
    RolloutExists,
    RolloutRecord,
)
from controller.store.sqlite_events import StoreConnection, add_event, dumps, loads
from margo_stream.errors import NotFound

T = TypeVar("T")
_COLUMNS = "tenant, name, version, phase, spec, state, created, updated, owner, owner_until"
_ACTIVE = ", ".join(f"'{p}'" for p in ACTIVE_PHASES)


def rollout_not_found(name: str) -> NotFound:
    return NotFound(f"rollout {name!r} not found (margoctl get rollouts lists them)")


def _record(row: tuple[Any, ...]) -> RolloutRecord:
    return RolloutRecord(row[0], row[1], row[2], row[3], loads(row[4]), loads(row[5]), *row[6:])


def _get(conn: StoreConnection, tenant: str, name: str) -> RolloutRecord:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM rollouts WHERE tenant = ? AND name = ?", (tenant, name)
    ).fetchone()
    if row is None:
        raise rollout_not_found(name)
    return _record(row)


def _events(conn: StoreConnection, tenant: str, events: Sequence[RolloutEvent], now: float) -> None:
    for kind, device_id, payload in events:
        add_event(conn, tenant, kind, device_id, payload, now)


def create_rollout(
    conn: StoreConnection,
    tenant: str,
    name: str,
    spec: JsonDict,
    state: JsonDict,
    phase: str,
    events: Sequence[RolloutEvent],
    now: float,
) -> RolloutRecord:
    exists = conn.execute(
        "SELECT 1 FROM rollouts WHERE tenant = ? AND name = ?", (tenant, name)
    ).fetchone()
    if exists:
        raise RolloutExists(f"rollout {name!r} exists already: choose another name")
    conn.execute(
        f"INSERT INTO rollouts ({_COLUMNS}) VALUES (?, ?, 1, ?, ?, ?, ?, ?, NULL, NULL)",
        (tenant, name, phase, dumps(spec), dumps(state), now, now),
    )
    _events(conn, tenant, events, now)
    return _get(conn, tenant, name)


def save_rollout(
    conn: StoreConnection,
    tenant: str,
    name: str,
    version: int,
    state: JsonDict,
    phase: str,
    events: Sequence[RolloutEvent],
    now: float,
) -> RolloutRecord:
    cur = conn.execute(
        "UPDATE rollouts SET version = version + 1, state = ?, phase = ?, updated = ?"
        " WHERE tenant = ? AND name = ? AND version = ?",
        (dumps(state), phase, now, tenant, name, version),
    )
    if cur.rowcount == 0:
        current = _get(conn, tenant, name)  # NotFound if it is gone
        raise RolloutConflict(
            f"rollout {name!r} changed meanwhile (version {current.version}, not {version})"
        )
    _events(conn, tenant, events, now)
    return _get(conn, tenant, name)


def list_rollouts(conn: StoreConnection, tenant: str, limit: int) -> list[RolloutRecord]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM rollouts WHERE tenant = ? ORDER BY created DESC, name LIMIT ?",
        (tenant, limit),
    ).fetchall()
    return [_record(r) for r in rows]


def claim_rollouts(
    conn: StoreConnection, owner: str, ttl: float, now: float, steal: bool
) -> list[tuple[str, str]]:
    conn.execute(
        f"UPDATE rollouts SET owner = ?, owner_until = ? WHERE phase IN ({_ACTIVE})"
        " AND (? OR owner IS NULL OR owner = ? OR owner_until < ?)",
        (owner, now + ttl, steal, owner, now),
    )
    rows = conn.execute(
        f"SELECT tenant, name FROM rollouts WHERE phase IN ({_ACTIVE}) AND owner = ?"
        " ORDER BY created",
        (owner,),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def release_rollouts(conn: StoreConnection, owner: str) -> None:
    conn.execute("UPDATE rollouts SET owner = NULL, owner_until = NULL WHERE owner = ?", (owner,))


class SqliteRollouts:
    """The rollout methods of the store; ``SqliteStore`` inherits them."""

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    async def create_rollout(
        self,
        tenant: str,
        name: str,
        *,
        spec: JsonDict,
        state: JsonDict,
        phase: str,
        events: Sequence[RolloutEvent] = (),
        now: float | None = None,
    ) -> RolloutRecord:
        return await self._write(
            create_rollout, tenant, name, spec, state, phase, list(events), _now(now)
        )

    async def get_rollout(self, tenant: str, name: str) -> RolloutRecord:
        return await self._read(_get, tenant, name)

    async def list_rollouts(self, tenant: str, *, limit: int = 100) -> list[RolloutRecord]:
        return await self._read(list_rollouts, tenant, limit)

    async def save_rollout(
        self,
        tenant: str,
        name: str,
        *,
        version: int,
        state: JsonDict,
        phase: str,
        events: Sequence[RolloutEvent] = (),
        now: float | None = None,
    ) -> RolloutRecord:
        return await self._write(
            save_rollout, tenant, name, version, state, phase, list(events), _now(now)
        )

    async def claim_rollouts(
        self, owner: str, *, ttl: float, now: float | None = None, steal: bool = False
    ) -> list[tuple[str, str]]:
        return await self._write(claim_rollouts, owner, ttl, _now(now), steal)

    async def release_rollouts(self, owner: str) -> None:
        await self._write(release_rollouts, owner)
