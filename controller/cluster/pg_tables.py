"""The cluster's own tables in the store's PostgreSQL database.

They are created at every start with ``CREATE ... IF NOT EXISTS`` inside one transaction that
holds the store's migration lock (``controller.store.pg_schema.MIGRATION_LOCK_KEY``), so
controllers starting at once, and the store's own migrations, run one after the other.

- ``controller_instances``: one row per running controller, its addresses and a heartbeat that
  keeps it, and every lease it holds, alive until ``alive_until``.
- ``device_leases``: which instance holds each device's session; ``expires_at`` is infinity
  while held and now() once released (PostgreSQL's clock, so the instances' clocks do not
  matter); a lease is live while it is not released and its instance is alive
  (``controller.cluster.leases``). ``generation`` only grows: a release keeps the row, so a
  generation is never reused.
- ``cluster_changes``: what one controller tells the others (``controller.cluster.changes``);
  ids are handed out under ``CHANGES_LOCK_KEY`` so they become visible in increasing order and
  a reader that has seen id N never misses a smaller one later.
"""

from __future__ import annotations

import asyncpg

from controller.store.pg_schema import MIGRATION_LOCK_KEY

# pg_advisory_xact_lock key serializing publishers of cluster_changes ("margo-ch")
CHANGES_LOCK_KEY = int.from_bytes(b"margo-ch", "big", signed=True)
CHANNEL = "margo_cluster"  # the one LISTEN/NOTIFY channel; a notification only says "look"

TABLES = """
CREATE TABLE IF NOT EXISTS controller_instances (
    id text PRIMARY KEY,
    api_url text NOT NULL DEFAULT '',
    quic_addr text NOT NULL DEFAULT '',
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE controller_instances
    ADD COLUMN IF NOT EXISTS alive_until timestamptz NOT NULL DEFAULT now();
CREATE TABLE IF NOT EXISTS device_leases (
    tenant text NOT NULL,
    device_id text NOT NULL,
    instance_id text NOT NULL,
    generation bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (tenant, device_id)
);
ALTER TABLE device_leases ADD COLUMN IF NOT EXISTS transport text NOT NULL DEFAULT 'quic';
CREATE INDEX IF NOT EXISTS device_leases_instance ON device_leases (instance_id);
CREATE TABLE IF NOT EXISTS cluster_changes (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    payload jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS cluster_changes_at ON cluster_changes (at);
"""


async def create_tables(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(TABLES)
