"""Device leases in PostgreSQL: one holder per device across the cluster, fenced by generation.

Theory of operation
-------------------
A controller takes a device's lease when it admits the device's session (after the identity
check, before the hello is answered): ``acquire`` sets the holder to this instance and the
generation to the stored one plus one, whoever held it and whether or not it had expired, in
one statement that locks the row (``FOR UPDATE``), so concurrent acquisitions of one device get
distinct, increasing generations. It returns the instance that held it before, which the new
holder tells to close its session (``REPLACED``).

A held lease has no expiry of its own (``expires_at`` is infinity): it lives as long as its
holder's instance row is alive (``controller_instances.alive_until``), which the instance's
``heartbeat`` pushes forward every few seconds. So keeping 50,000 leases costs one row update,
not 50,000, and a crashed instance's leases all end together when its heartbeat lapses: its
devices show as disconnected within the lease time. ``holders`` is the only judge of liveness,
and it joins the two.

Every write of a holder names its generation and instance: ``release`` (at disconnect) sets
``expires_at`` to now only when the lease is still the caller's, so a session that lost its
device can neither end the new holder's lease nor mark the device disconnected. A lease taken
by another instance is usually heard of through its REPLACED notice; as a backstop the holder
compares ``live_count`` with what it thinks it holds on every heartbeat (one integer back) and
reads ``live_leases`` only when they differ. Rows are never deleted, so generations are never
reused.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from controller.ports import Holder, Lease

Db = asyncpg.Pool | asyncpg.Connection

_ACQUIRE = """
WITH old AS (
    SELECT instance_id, generation FROM device_leases
    WHERE tenant = $1 AND device_id = $2 FOR UPDATE
), updated AS (
    UPDATE device_leases AS l
    SET instance_id = $3, generation = old.generation + 1,
        expires_at = 'infinity', transport = $4
    FROM old WHERE l.tenant = $1 AND l.device_id = $2
    RETURNING l.generation, old.instance_id AS previous
), inserted AS (
    INSERT INTO device_leases (tenant, device_id, instance_id, generation, expires_at, transport)
    SELECT $1, $2, $3, 1, 'infinity'::timestamptz, $4
    WHERE NOT EXISTS (SELECT 1 FROM old)
    ON CONFLICT (tenant, device_id) DO NOTHING
    RETURNING generation, NULL::text AS previous
)
SELECT generation, previous FROM updated UNION ALL SELECT generation, previous FROM inserted
"""

_HEARTBEAT = """
UPDATE controller_instances
SET heartbeat_at = now(), alive_until = now() + make_interval(secs => $2)
WHERE id = $1
RETURNING 1
"""

_HOLDERS = """
SELECT l.device_id, l.instance_id, l.transport FROM device_leases AS l
JOIN controller_instances AS i ON i.id = l.instance_id AND i.alive_until > now()
WHERE l.tenant = $1 AND l.expires_at > now()"""

_RELEASE = """
UPDATE device_leases SET expires_at = now()
WHERE tenant = $1 AND device_id = $2 AND instance_id = $3 AND generation = $4
RETURNING 1
"""


class LeaseError(Exception):
    """A lease could not be taken (the store did not answer as expected)."""


async def acquire(
    db: Db, instance_id: str, tenant: str, device_id: str, transport: str = "quic"
) -> Lease:
    """Take the device's lease with the next generation (alive while the instance is), for a
    session over ``transport``."""
    for _ in range(3):  # two first acquisitions at once: one inserts, the other updates next
        row = await db.fetchrow(_ACQUIRE, tenant, device_id, instance_id, transport)
        if row is not None:
            previous = row["previous"]
            return Lease(
                tenant,
                device_id,
                int(row["generation"]),
                previous if previous not in (None, instance_id) else None,
            )
    raise LeaseError(f"could not take the lease of {tenant}/{device_id}: contended three times")


async def heartbeat(db: Db, instance_id: str, seconds: float) -> None:
    """Keep the instance, and so every lease it holds, alive for ``seconds`` more (the row is
    made again if it was pruned while this instance could not reach the store)."""
    if await db.fetchval(_HEARTBEAT, instance_id, seconds) is None:
        await db.execute(
            "INSERT INTO controller_instances (id, alive_until)"
            " VALUES ($1, now() + make_interval(secs => $2)) ON CONFLICT (id) DO UPDATE"
            " SET heartbeat_at = now(), alive_until = excluded.alive_until",
            instance_id,
            seconds,
        )


async def live_count(db: Db, instance_id: str) -> int:
    """How many leases the store says ``instance_id`` holds (one integer over the wire)."""
    count = await db.fetchval(
        "SELECT count(*) FROM device_leases WHERE instance_id = $1 AND expires_at > now()",
        instance_id,
    )
    return int(count)


async def live_leases(db: Db, instance_id: str) -> set[tuple[str, str, int]]:
    """(tenant, device, generation) of every lease the store says ``instance_id`` holds."""
    rows = await db.fetch(
        "SELECT tenant, device_id, generation FROM device_leases"
        " WHERE instance_id = $1 AND expires_at > now()",
        instance_id,
    )
    return {(r["tenant"], r["device_id"], int(r["generation"])) for r in rows}


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


async def holders(
    db: Db, tenant: str, device_ids: Sequence[str] | None = None
) -> dict[str, Holder]:
    """device id -> instance holding a live lease (not released, its instance's heartbeat not
    lapsed), for the tenant (or those devices)."""
    if device_ids is None:
        rows = await db.fetch(_HOLDERS, tenant)
    else:
        rows = await db.fetch(
            _HOLDERS + " AND l.device_id = ANY($2::text[])", tenant, list(device_ids)
        )
    return {r["device_id"]: Holder(r["instance_id"], r["transport"]) for r in rows}
