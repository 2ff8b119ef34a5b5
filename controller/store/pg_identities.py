"""PostgreSQL store, part: device identities, the tenants' allow-lists (``device_identities``).

The semantics are SQLite's (``controller.store.sqlite_identities``): every change appends
``device.allowed`` or ``device.revoked`` to the tenant's event feed in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from controller.store.base import (
    IDENTITY_ALLOWED,
    IDENTITY_REVOKED,
    IdentityImport,
    IdentityRecord,
    import_is_newer,
    import_merged,
)
from controller.store.base import resolve_now as _now
from controller.store.pg_events import Transactions, Tx, add_event
from controller.store.sqlite_identities import _check_key, identity_not_found

_COLUMNS = "tenant, device_id, key_sha256, state, not_after, updated"


def _record(row: asyncpg.Record) -> IdentityRecord:
    return IdentityRecord(*row)


async def _get(tx: Tx, tenant: str, device_id: str, *, lock: bool = False) -> IdentityRecord | None:
    row = await tx.conn.fetchrow(
        f"SELECT {_COLUMNS} FROM device_identities WHERE tenant = $1 AND device_id = $2"
        + (" FOR UPDATE" if lock else ""),
        tenant,
        device_id,
    )
    return None if row is None else _record(row)


async def _put(tx: Tx, rec: IdentityRecord) -> None:
    await tx.conn.execute(
        f"INSERT INTO device_identities ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (tenant, device_id) DO UPDATE SET key_sha256 = excluded.key_sha256,"
        " state = excluded.state, not_after = excluded.not_after, updated = excluded.updated",
        rec.tenant,
        rec.device_id,
        rec.key_sha256,
        rec.state,
        rec.not_after,
        rec.updated,
    )


async def allow_identity(
    tx: Tx, tenant: str, device_id: str, key_sha256: str, not_after: float, now: float
) -> None:
    _check_key(key_sha256)
    rec = IdentityRecord(tenant, device_id, key_sha256, IDENTITY_ALLOWED, float(not_after), now)
    await _put(tx, rec)
    add_event(tx, tenant, "device.allowed", device_id, {"not_after": rec.not_after}, now)


async def revoke_identity(tx: Tx, tenant: str, device_id: str, now: float) -> None:
    old = await _get(tx, tenant, device_id, lock=True)
    if old is None:
        raise identity_not_found(device_id)
    rec = IdentityRecord(tenant, device_id, old.key_sha256, IDENTITY_REVOKED, old.not_after, now)
    await _put(tx, rec)
    if old.state != IDENTITY_REVOKED:
        add_event(tx, tenant, "device.revoked", device_id, {}, now)


async def get_identity(tx: Tx, tenant: str, device_id: str) -> IdentityRecord:
    rec = await _get(tx, tenant, device_id)
    if rec is None:
        raise identity_not_found(device_id)
    return rec


async def list_identities(tx: Tx) -> list[IdentityRecord]:
    rows = await tx.conn.fetch(
        f"SELECT {_COLUMNS} FROM device_identities ORDER BY tenant, device_id"
    )
    return [_record(r) for r in rows]


async def import_identities(
    tx: Tx, items: Sequence[IdentityImport], now: float
) -> list[IdentityRecord]:
    for item in items:
        _check_key(item[2])
    keys = sorted({(item[0], item[1]) for item in items})
    rows = await tx.conn.fetch(
        f"SELECT {_COLUMNS} FROM device_identities i"
        " JOIN unnest($1::text[], $2::text[]) AS k(t, d) ON i.tenant = k.t AND i.device_id = k.d"
        " ORDER BY i.tenant, i.device_id FOR UPDATE OF i",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    known: dict[tuple[str, str], IdentityRecord] = {(r[0], r[1]): _record(r) for r in rows}
    changed = []
    for item in items:
        old = known.get((item[0], item[1]))
        if not import_is_newer(item, old):
            continue
        rec = import_merged(item, old, now)
        if old is not None and (old.key_sha256, old.state, old.not_after) == (
            rec.key_sha256,
            rec.state,
            rec.not_after,
        ):
            continue
        await _put(tx, rec)
        known[(rec.tenant, rec.device_id)] = rec
        if rec.state == IDENTITY_ALLOWED:
            add_event(tx, rec.tenant, "device.allowed", rec.device_id, {"imported": True}, now)
        changed.append(rec)
    return changed


class PgIdentities(Transactions):
    """The allow-list methods of ``Store``; ``PgStore`` inherits them and supplies the
    transactions (``_write``/``_read`` run a coroutine function of a ``Tx``)."""

    async def allow_identity(
        self,
        tenant: str,
        device_id: str,
        key_sha256: str,
        not_after: float,
        *,
        now: float | None = None,
    ) -> None:
        await self._write(allow_identity, tenant, device_id, key_sha256, not_after, _now(now))

    async def revoke_identity(
        self, tenant: str, device_id: str, *, now: float | None = None
    ) -> None:
        await self._write(revoke_identity, tenant, device_id, _now(now))

    async def get_identity(self, tenant: str, device_id: str) -> IdentityRecord:
        return await self._read(get_identity, tenant, device_id)

    async def list_identities(self) -> list[IdentityRecord]:
        return await self._read(list_identities)

    async def import_identities(
        self, items: Sequence[IdentityImport], *, now: float | None = None
    ) -> list[IdentityRecord]:
        if not items:
            return []
        return await self._write(import_identities, list(items), _now(now))
