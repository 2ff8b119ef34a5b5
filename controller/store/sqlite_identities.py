"""SQLite store, part: device identities, the tenants' allow-lists (table ``device_identities``).

Runs on the worker thread inside the caller's transaction. Every change appends
``device.allowed`` or ``device.revoked`` to the tenant's event feed in the same transaction.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from controller.store.base import (
    IDENTITY_ALLOWED,
    IDENTITY_REVOKED,
    IdentityImport,
    IdentityRecord,
    import_is_newer,
    import_merged,
)
from controller.store.base import resolve_now as _now
from controller.store.sqlite_events import StoreConnection, add_event
from margo_stream.errors import NotFound

_COLUMNS = "tenant, device_id, key_sha256, state, not_after, updated"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def identity_not_found(device_id: str) -> NotFound:
    return NotFound(f"device {device_id!r} is not on the allow-list")


def _record(row: tuple[Any, ...]) -> IdentityRecord:
    return IdentityRecord(
        tenant=row[0],
        device_id=row[1],
        key_sha256=row[2],
        state=row[3],
        not_after=row[4],
        updated=row[5],
    )


def _check_key(key_sha256: str) -> None:
    if not isinstance(key_sha256, str) or not _HEX64.fullmatch(key_sha256):
        raise ValueError("key_sha256 must be 64 lowercase hex digits")


def _get(conn: StoreConnection, tenant: str, device_id: str) -> IdentityRecord | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM device_identities WHERE tenant = ? AND device_id = ?",
        (tenant, device_id),
    ).fetchone()
    return None if row is None else _record(row)


def _put(conn: StoreConnection, rec: IdentityRecord) -> None:
    conn.execute(
        f"INSERT INTO device_identities ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (tenant, device_id) DO UPDATE SET key_sha256 = excluded.key_sha256,"
        " state = excluded.state, not_after = excluded.not_after, updated = excluded.updated",
        (rec.tenant, rec.device_id, rec.key_sha256, rec.state, rec.not_after, rec.updated),
    )


def allow_identity(
    conn: StoreConnection,
    tenant: str,
    device_id: str,
    key_sha256: str,
    not_after: float,
    now: float,
) -> IdentityRecord:
    _check_key(key_sha256)
    rec = IdentityRecord(tenant, device_id, key_sha256, IDENTITY_ALLOWED, float(not_after), now)
    _put(conn, rec)
    add_event(conn, tenant, "device.allowed", device_id, {"not_after": rec.not_after}, now)
    return rec


def revoke_identity(
    conn: StoreConnection, tenant: str, device_id: str, now: float
) -> IdentityRecord:
    old = _get(conn, tenant, device_id)
    if old is None:
        raise identity_not_found(device_id)
    rec = IdentityRecord(tenant, device_id, old.key_sha256, IDENTITY_REVOKED, old.not_after, now)
    _put(conn, rec)
    if old.state != IDENTITY_REVOKED:
        add_event(conn, tenant, "device.revoked", device_id, {}, now)
    return rec


def get_identity(conn: StoreConnection, tenant: str, device_id: str) -> IdentityRecord:
    rec = _get(conn, tenant, device_id)
    if rec is None:
        raise identity_not_found(device_id)
    return rec


def list_identities(conn: StoreConnection) -> list[IdentityRecord]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM device_identities ORDER BY tenant, device_id"
    ).fetchall()
    return [_record(r) for r in rows]


def import_identities(
    conn: StoreConnection, items: Sequence[IdentityImport], now: float
) -> list[IdentityRecord]:
    changed = []
    for item in items:
        _check_key(item[2])
        old = _get(conn, item[0], item[1])
        if not import_is_newer(item, old):
            continue
        rec = import_merged(item, old, now)
        if old is not None and (old.key_sha256, old.state, old.not_after) == (
            rec.key_sha256,
            rec.state,
            rec.not_after,
        ):
            continue
        _put(conn, rec)
        if rec.state == IDENTITY_ALLOWED:
            add_event(conn, rec.tenant, "device.allowed", rec.device_id, {"imported": True}, now)
        changed.append(rec)
    return changed


T = TypeVar("T")


class SqliteIdentities:
    """The ``Store`` methods of this part; ``SqliteStore`` inherits them and supplies the
    transactions (``_write``/``_read`` run a function of the connection on its thread)."""

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

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
