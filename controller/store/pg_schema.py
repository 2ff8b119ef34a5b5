"""The PostgreSQL store's schema and its migrations.

Theory of operation
-------------------
``MIGRATIONS[i]`` takes a database from schema version ``i`` to ``i + 1``; never edit one that
has shipped, append a new one. ``schema_version`` holds one row per applied version (when it
was applied), so a test or an operator can see that each was applied exactly once. Every
migration runs in its own transaction together with its row, holding the transaction-scoped
advisory lock ``MIGRATION_LOCK_KEY``: controllers starting at once on an empty database
migrate one after the other, the later ones find the schema current and change nothing, and a
crash leaves the database at one version or the next. Other modules that keep tables in the
same database (the cluster's instances and leases) create them under the same key.

Telemetry is **indexed, not partitioned**. Retention deletes a tenant's oldest records in
batches found by the index ``(tenant, received_at)`` (by age, and oldest-first for the
per-tenant size cap), which stays cheap at any table size. Partitioning by time would turn
deletion by age into dropping partitions, but the size cap still deletes rows inside them,
and a partitioned table's primary key must contain the partition key: ``(tenant, device,
seq)`` could then no longer be unique across partitions, and a record retransmitted after
midnight would be stored twice. Exactly-once ingest is worth more than cheaper drops.

Each tenant's payload bytes (``telemetry_usage``) are kept exact by ingest and deletions in
their own transactions, split over 64 rows per tenant (``shard`` = a hash of the device id):
every ingest updates its shard's row, and one row per tenant would make every ingest of a
tenant wait for the previous one to commit. The tenant's usage is the sum of its shards.

The watermark walk (``margo_telemetry_advance``) runs in the server, inside the ingest's one
statement (``controller.store.pg_telemetry``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from margo_stream.errors import StoreError

if TYPE_CHECKING:
    from controller.store.pg_events import Conn

# pg_advisory_xact_lock key shared by everything that creates tables in the store's database
# ("margo-mi" as a big-endian 64-bit integer; any fixed bigint would do).
MIGRATION_LOCK_KEY = int.from_bytes(b"margo-mi", "big", signed=True)

USAGE_SHARDS = 64  # rows of telemetry_usage per tenant; the SQL says ``& 63``

MIGRATIONS: tuple[str, ...] = (
    # 1: the schema of SQLite's version 7 (controller/store/sqlite_schema.py) plus telemetry
    # version 2, in one database. Identifiers compare bytewise (COLLATE "C", as SQLite's
    # BINARY): the same order as SQLite, and cheap index comparisons whatever the database's
    # locale. Telemetry has no index by (device, time): ingest pays for two indexes, not
    # three; a query of one device's records since a time reads them in seq order, or the
    # tenant's since then, whichever the planner finds cheaper.
    """
    CREATE TABLE devices (
        tenant text COLLATE "C" NOT NULL,
        device_id text COLLATE "C" NOT NULL,
        capabilities text NOT NULL DEFAULT '{}',
        labels text NOT NULL DEFAULT '{}',
        reported_labels text NOT NULL DEFAULT '{}',
        connected boolean NOT NULL DEFAULT false,
        last_seen double precision,
        first_seen double precision NOT NULL,
        connection_count bigint NOT NULL DEFAULT 0,
        manifest_version bigint,
        remote text,
        stats text NOT NULL DEFAULT '{}',
        PRIMARY KEY (tenant, device_id)
    ) WITH (fillfactor = 80);
    CREATE INDEX devices_connected ON devices (tenant) WHERE connected;

    CREATE TABLE blobs (
        tenant text COLLATE "C" NOT NULL,
        digest text COLLATE "C" NOT NULL,
        data bytea NOT NULL,
        created double precision NOT NULL,
        PRIMARY KEY (tenant, digest)
    );

    CREATE TABLE deployments (
        tenant text COLLATE "C" NOT NULL,
        deployment_id text COLLATE "C" NOT NULL,
        digest text COLLATE "C" NOT NULL,
        name text NOT NULL,
        profile text NOT NULL,
        created double precision NOT NULL,
        signature text,
        certificate text,
        PRIMARY KEY (tenant, deployment_id, digest),
        FOREIGN KEY (tenant, digest) REFERENCES blobs (tenant, digest)
    );
    CREATE INDEX deployments_newest ON deployments (tenant, deployment_id, created DESC);

    CREATE TABLE assignments (
        tenant text COLLATE "C" NOT NULL,
        device_id text COLLATE "C" NOT NULL,
        deployment_id text COLLATE "C" NOT NULL,
        digest text COLLATE "C" NOT NULL,
        assigned_at double precision NOT NULL,
        PRIMARY KEY (tenant, device_id, deployment_id),
        FOREIGN KEY (tenant, device_id) REFERENCES devices (tenant, device_id),
        FOREIGN KEY (tenant, deployment_id, digest)
            REFERENCES deployments (tenant, deployment_id, digest)
    );

    CREATE TABLE manifests (
        tenant text COLLATE "C" NOT NULL,
        device_id text COLLATE "C" NOT NULL,
        version bigint NOT NULL,
        manifest bytea NOT NULL,
        signature bytea NOT NULL,
        created double precision NOT NULL,
        PRIMARY KEY (tenant, device_id, version),
        FOREIGN KEY (tenant, device_id) REFERENCES devices (tenant, device_id)
    );

    CREATE TABLE issued_deployments (
        tenant text COLLATE "C" NOT NULL,
        device_id text COLLATE "C" NOT NULL,
        deployment_id text COLLATE "C" NOT NULL,
        first_version bigint NOT NULL,
        PRIMARY KEY (tenant, device_id, deployment_id)
    );

    CREATE TABLE statuses (
        tenant text COLLATE "C" NOT NULL,
        device_id text COLLATE "C" NOT NULL,
        deployment_id text COLLATE "C" NOT NULL,
        status text NOT NULL,
        state text,  -- status_state(status), so the next status's event needs no parse
        seq bigint NOT NULL,
        updated_at double precision NOT NULL,
        PRIMARY KEY (tenant, device_id, deployment_id),
        FOREIGN KEY (tenant, device_id) REFERENCES devices (tenant, device_id)
    ) WITH (fillfactor = 80);

    CREATE TABLE device_identities (
        tenant text COLLATE "C" NOT NULL,
        device_id text COLLATE "C" NOT NULL,
        key_sha256 text NOT NULL,
        state text NOT NULL CHECK (state IN ('allowed', 'revoked')),
        not_after double precision NOT NULL,
        updated double precision NOT NULL,
        PRIMARY KEY (tenant, device_id)
    );

    CREATE TABLE session_audits (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        tenant text COLLATE "C" NOT NULL,
        device_id text COLLATE "C" NOT NULL,
        operator text NOT NULL,
        command text,
        started_at double precision NOT NULL,
        ended_at double precision,
        bytes_in bigint NOT NULL DEFAULT 0,
        bytes_out bigint NOT NULL DEFAULT 0,
        reason text,
        exit_status integer
    );
    CREATE INDEX session_audits_by_tenant ON session_audits (tenant, id);
    CREATE INDEX session_audits_by_end ON session_audits (ended_at);

    CREATE TABLE events (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        tenant text COLLATE "C" NOT NULL,
        ts double precision NOT NULL,
        kind text NOT NULL,
        device_id text COLLATE "C",
        payload text NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_tenant ON events (tenant, id);
    CREATE INDEX events_by_ts ON events (ts);

    CREATE TABLE telemetry (
        tenant text COLLATE "C" NOT NULL,
        device_id text COLLATE "C" NOT NULL,
        seq bigint NOT NULL,
        stream text COLLATE "C" NOT NULL,
        received_at double precision NOT NULL,
        payload bytea NOT NULL,
        PRIMARY KEY (tenant, device_id, seq)
    );
    CREATE INDEX telemetry_by_tenant_received ON telemetry (tenant, received_at);

    CREATE TABLE telemetry_state (
        tenant text COLLATE "C" NOT NULL,
        device_id text COLLATE "C" NOT NULL,
        watermark bigint NOT NULL,
        PRIMARY KEY (tenant, device_id)
    ) WITH (fillfactor = 70);

    CREATE TABLE telemetry_gaps (
        tenant text COLLATE "C" NOT NULL,
        device_id text COLLATE "C" NOT NULL,
        first bigint NOT NULL,
        last bigint NOT NULL,
        recorded_at double precision NOT NULL,
        PRIMARY KEY (tenant, device_id, first)
    );

    CREATE TABLE telemetry_usage (
        tenant text COLLATE "C" NOT NULL,
        shard integer NOT NULL,
        bytes bigint NOT NULL,
        PRIMARY KEY (tenant, shard)
    ) WITH (fillfactor = 50);

    -- The highest seq w' >= w such that every seq in w+1..w' is stored, inside a gap, or
    -- inside one of the runs lo[i]..hi[i] (the batch being inserted by the same statement,
    -- which that statement cannot read back).
    CREATE FUNCTION margo_telemetry_advance(
        t text, d text, w bigint, lo bigint[], hi bigint[]
    ) RETURNS bigint
    LANGUAGE plpgsql STABLE AS $fn$
    DECLARE
        s bigint;
        nxt bigint;
    BEGIN
        LOOP
            FOR s IN SELECT seq FROM telemetry
                     WHERE tenant = t AND device_id = d AND seq > w ORDER BY seq LOOP
                EXIT WHEN s <> w + 1;
                w := s;
            END LOOP;
            SELECT max(x) INTO nxt FROM (
                SELECT last AS x FROM telemetry_gaps
                WHERE tenant = t AND device_id = d AND first <= w + 1 AND last > w
                UNION ALL
                SELECT r.h FROM unnest(lo, hi) AS r(l, h) WHERE r.l <= w + 1 AND r.h > w
            ) AS runs;
            IF nxt IS NULL THEN
                RETURN w;
            END IF;
            w := nxt;
        END LOOP;
    END
    $fn$;
    """,
    # 1 -> 2: rollouts (SQLite's version 8; controller/store/rollouts.py)
    """
    CREATE TABLE rollouts (
        tenant text COLLATE "C" NOT NULL,
        name text COLLATE "C" NOT NULL,
        version bigint NOT NULL,
        phase text NOT NULL,
        spec text NOT NULL,
        state text NOT NULL,
        created double precision NOT NULL,
        updated double precision NOT NULL,
        owner text,
        owner_until double precision,
        PRIMARY KEY (tenant, name)
    );
    CREATE INDEX rollouts_active ON rollouts (phase)
        WHERE phase IN ('running', 'paused', 'rolling-back');
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version integer PRIMARY KEY, applied_at double precision NOT NULL)"
)


async def migrate(conn: Conn, name: str, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """Bring the database to the last of ``migrations``; returns the version it had. ``name``
    (the redacted DSN) is what errors say. Safe to run from many processes at once."""
    start: int | None = None
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await conn.execute(_VERSION_TABLE)
            current = int(
                await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            )
            if start is None:
                start = current
            if current > len(migrations):
                raise StoreError(
                    f"PostgreSQL store {name} has schema version {current}, newer than this"
                    f" controller supports ({len(migrations)}); upgrade margo-stream or use"
                    " another database"
                )
            if current == len(migrations):
                return start
            await conn.execute(migrations[current])  # no arguments: several statements
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                current + 1,
                time.time(),
            )
