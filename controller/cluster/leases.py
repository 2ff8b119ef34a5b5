"""Device leases in PostgreSQL: one holder per device across the cluster, fenced by generation.

Theory of operation
-------------------
A controller takes a device's lease when it admits the device's session (after the identity
check, before the hello is answered): ``acquire`` sets the holder to this instance and the
generation to the stored one plus one, whoever held it and whether or not it had expired, in
one statement that locks the row (``FOR UPDATE``), so concurrent acquisitions of one device get
distinct, increasing generations. It returns the instance that held it before, which the new
holder tells to close its session (``REPLACED``).

Every write of a holder names its generation and instance: ``renew`` (in batches, on a timer)
returns the leases it extended, and a lease it did not extend was taken by someone else;
``release`` (at disconnect) sets ``expires_at`` to now only when the lease is still the
caller's, so a session that lost its device can neither extend nor end the new holder's lease,
nor mark the device disconnected. A crashed instance renews nothing: its leases expire and its
devices show as disconnected within the lease time. Rows are never deleted, so generations are
never reused.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from controller.ports import Lease

Db = asyncpg.Pool | asyncpg.Connection

_ACQUIRE = """
WITH old AS (
    SELECT instance_id, generation FROM device_leases
    WHERE tenant = $1 AND device_id = $2 FOR UPDATE
), updated AS (
    UPDATE device_leases AS l
    SET instance_id = $3, generation = old.generation + 1,
        expires_at = now() + make_interval(secs => $4)
    FROM old WHERE l.tenant = $1 AND l.device_id = $2
    RETURNING l.generation, old.instance_id AS previous
), inserted AS (
    INSERT INTO device_leases (tenant, device_id, instance_id, generation, expires_at)
    SELECT $1, $2, $3, 1, now() + make_interval(secs => $4)
    WHERE NOT EXISTS (SELECT 1 FROM old)
    ON CONFLICT (tenant, device_id) DO NOTHING
    RETURNING generation, NULL::text AS previous
)
SELECT generation, previous FROM updated UNION ALL SELECT generation, previous FROM inserted
"""

_RENEW = """
UPDATE device_leases AS l SET expires_at = now() + make_interval(secs => $2)
FROM unnest($3::text[], $4::text[], $5::bigint[]) AS h(tenant, device_id, generation)
WHERE l.tenant = h.tenant AND l.device_id = h.device_id AND l.generation = h.generation
  AND l.instance_id = $1
RETURNING l.tenant, l.device_id, l.generation
"""

_RELEASE = """
UPDATE device_leases SET expires_at = now()
WHERE tenant = $1 AND device_id = $2 AND instance_id = $3 AND generation = $4
RETURNING 1
"""

RENEW_CHUNK = 5000  # leases per renewal statement


class LeaseError(Exception):
    """A lease could not be taken (the store did not answer as expected)."""


async def acquire(db: Db, instance_id: str, tenant: str, device_id: str, seconds: float) -> Lease:
    """Take the device's lease for ``seconds`` with the next generation."""
    for _ in range(3):  # two first acquisitions at once: one inserts, the other updates next
        row = await db.fetchrow(_ACQUIRE, tenant, device_id, instance_id, seconds)
        if row is not None:
            previous = row["previous"]
            return Lease(
                tenant,
                device_id,
                int(row["generation"]),
                previous if previous not in (None, instance_id) else None,
            )
    raise LeaseError(f"could not take the lease of {tenant}/{device_id}: contended three times")


async def renew(
    db: Db, instance_id: str, leases: Sequence[Lease], seconds: float
) -> set[tuple[str, str, int]]:
    """Extend ``leases`` by ``seconds``; returns (tenant, device, generation) of those still
    this instance's (the others were taken)."""
    kept: set[tuple[str, str, int]] = set()
    for start in range(0, len(leases), RENEW_CHUNK):
        chunk = leases[start : start + RENEW_CHUNK]
        rows = await db.fetch(
            _RENEW,
            instance_id,
            seconds,
            [lease.tenant for lease in chunk],
            [lease.device_id for lease in chunk],
            [lease.generation for lease in chunk],
        )
        kept.update((r["tenant"], r["device_id"], int(r["generation"])) for r in rows)
    return kept


async def release(db: Db, instance_id: str, lease: Lease) -> bool:
    """End the lease now if it is still this instance's generation; whether it was."""
    row = await db.fetchval(_RELEASE, lease.tenant, lease.device_id, instance_id, lease.generation)
    return row is not None


async def release_all(db: Db, instance_id: str) -> int:
    """End every lease of this instance (a clean stop): its devices may connect elsewhere."""
    status = await db.execute(
        "UPDATE device_leases SET expires_at = now() WHERE instance_id = $1 AND expires_at > now()",
        instance_id,
    )
    return int(status.rsplit(" ", 1)[-1])


async def holders(db: Db, tenant: str, device_ids: Sequence[str] | None = None) -> dict[str, str]:
    """device id -> instance holding an unexpired lease, for the tenant (or those devices)."""
    if device_ids is None:
        rows = await db.fetch(
            "SELECT device_id, instance_id FROM device_leases"
            " WHERE tenant = $1 AND expires_at > now()",
            tenant,
        )
    else:
        rows = await db.fetch(
            "SELECT device_id, instance_id FROM device_leases"
            " WHERE tenant = $1 AND device_id = ANY($2::text[]) AND expires_at > now()",
            tenant,
            list(device_ids),
        )
    return {r["device_id"]: r["instance_id"] for r in rows}
