"""PostgreSQL store, part: rollouts (table ``rollouts``). The semantics are SQLite's
(``controller.store.sqlite_rollouts``; ``controller.store.rollouts`` says what each method
promises). The lease is a column of the rollout's row, claimed in one statement: with several
controllers on the store, one of them holds each active rollout until its lease expires."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from controller.store.base import resolve_now as _now
from controller.store.pg_events import Transactions, Tx, add_event
from controller.store.rollouts import (
    ACTIVE_PHASES,
    JsonDict,
    RolloutConflict,
    RolloutEvent,
    RolloutExists,
    RolloutRecord,
)
from controller.store.sqlite_events import dumps, loads
from controller.store.sqlite_rollouts import rollout_not_found

_COLUMNS = "tenant, name, version, phase, spec, state, created, updated, owner, owner_until"


def _record(row: asyncpg.Record) -> RolloutRecord:
    return RolloutRecord(
        row[0], row[1], row[2], row[3], loads(row[4]), loads(row[5]), *tuple(row)[6:]
    )


async def _get(tx: Tx, tenant: str, name: str) -> RolloutRecord:
    row = await tx.conn.fetchrow(
        f"SELECT {_COLUMNS} FROM rollouts WHERE tenant = $1 AND name = $2", tenant, name
    )
    if row is None:
        raise rollout_not_found(name)
    return _record(row)


def _events(tx: Tx, tenant: str, events: Sequence[RolloutEvent], now: float) -> None:
    for kind, device_id, payload in events:
        add_event(tx, tenant, kind, device_id, payload, now)


async def create_rollout(
    tx: Tx,
    tenant: str,
    name: str,
    spec: JsonDict,
    state: JsonDict,
    phase: str,
    events: Sequence[RolloutEvent],
    now: float,
) -> RolloutRecord:
    row = await tx.conn.fetchrow(
        f"INSERT INTO rollouts ({_COLUMNS}) VALUES ($1, $2, 1, $3, $4, $5, $6, $6, NULL, NULL)"
        f" ON CONFLICT (tenant, name) DO NOTHING RETURNING {_COLUMNS}",
        tenant,
        name,
        phase,
        dumps(spec),
        dumps(state),
        now,
    )
    if row is None:
        raise RolloutExists(f"rollout {name!r} exists already: choose another name")
    _events(tx, tenant, events, now)
    return _record(row)


async def save_rollout(
    tx: Tx,
    tenant: str,
    name: str,
    version: int,
    state: JsonDict,
    phase: str,
    events: Sequence[RolloutEvent],
    now: float,
) -> RolloutRecord:
    row = await tx.conn.fetchrow(
        "UPDATE rollouts SET version = version + 1, state = $1, phase = $2, updated = $3"
        f" WHERE tenant = $4 AND name = $5 AND version = $6 RETURNING {_COLUMNS}",
        dumps(state),
        phase,
        now,
        tenant,
        name,
        version,
    )
    if row is None:
        current = await _get(tx, tenant, name)
        raise RolloutConflict(
            f"rollout {name!r} changed meanwhile (version {current.version}, not {version})"
        )
    _events(tx, tenant, events, now)
    return _record(row)


async def list_rollouts(tx: Tx, tenant: str, limit: int) -> list[RolloutRecord]:
    rows = await tx.conn.fetch(
        f"SELECT {_COLUMNS} FROM rollouts WHERE tenant = $1 ORDER BY created DESC, name LIMIT $2",
        tenant,
        limit,
    )
    return [_record(r) for r in rows]


async def claim_rollouts(
    tx: Tx, owner: str, ttl: float, now: float, steal: bool
) -> list[tuple[str, str]]:
    rows = await tx.conn.fetch(
        "UPDATE rollouts SET owner = $1, owner_until = $2 WHERE phase = ANY($3::text[])"
        " AND ($5 OR owner IS NULL OR owner = $1 OR owner_until < $4)"
        " RETURNING tenant, name, created",
        owner,
        now + ttl,
        list(ACTIVE_PHASES),
        now,
        steal,
    )
    return [(r[0], r[1]) for r in sorted(rows, key=lambda r: r[2])]


async def release_rollouts(tx: Tx, owner: str) -> None:
    await tx.conn.execute(
        "UPDATE rollouts SET owner = NULL, owner_until = NULL WHERE owner = $1", owner
    )


class PgRollouts(Transactions):
    """The rollout methods of ``Store``; ``PgStore`` inherits them."""

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
