"""The SQLite schema as an ordered list of migrations, and the code that applies them.

``MIGRATIONS[i]`` takes a database from schema version ``i`` to ``i + 1``. Never edit a
migration that has shipped; append a new one. The version lives in ``schema_version``.
"""

from __future__ import annotations

import sqlite3

from margo_stream.errors import StoreError

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE devices (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        capabilities TEXT NOT NULL DEFAULT '{}',
        labels TEXT NOT NULL DEFAULT '{}',
        connected INTEGER NOT NULL DEFAULT 0,
        last_seen REAL,
        first_seen REAL NOT NULL,
        connection_count INTEGER NOT NULL DEFAULT 0,
        manifest_version INTEGER,
        remote TEXT,
        stats TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (tenant, device_id)
    ) WITHOUT ROWID;

    CREATE TABLE blobs (
        tenant TEXT NOT NULL,
        digest TEXT NOT NULL,
        data BLOB NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (tenant, digest)
    );

    CREATE TABLE deployments (
        tenant TEXT NOT NULL,
        deployment_id TEXT NOT NULL,
        digest TEXT NOT NULL,
        name TEXT NOT NULL,
        profile TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (tenant, deployment_id, digest),
        FOREIGN KEY (tenant, digest) REFERENCES blobs (tenant, digest)
    ) WITHOUT ROWID;

    CREATE TABLE assignments (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        deployment_id TEXT NOT NULL,
        digest TEXT NOT NULL,
        assigned_at REAL NOT NULL,
        PRIMARY KEY (tenant, device_id, deployment_id),
        FOREIGN KEY (tenant, device_id) REFERENCES devices (tenant, device_id),
        FOREIGN KEY (tenant, deployment_id, digest)
            REFERENCES deployments (tenant, deployment_id, digest)
    ) WITHOUT ROWID;

    CREATE TABLE manifests (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        manifest BLOB NOT NULL,
        signature BLOB NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (tenant, device_id, version),
        FOREIGN KEY (tenant, device_id) REFERENCES devices (tenant, device_id)
    );

    CREATE TABLE statuses (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        deployment_id TEXT NOT NULL,
        status TEXT NOT NULL,
        seq INTEGER NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (tenant, device_id, deployment_id),
        FOREIGN KEY (tenant, device_id) REFERENCES devices (tenant, device_id)
    ) WITHOUT ROWID;

    CREATE TABLE telemetry (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        stream TEXT NOT NULL,
        received_at REAL NOT NULL,
        payload BLOB NOT NULL,
        PRIMARY KEY (tenant, device_id, seq),
        FOREIGN KEY (tenant, device_id) REFERENCES devices (tenant, device_id)
    );
    CREATE INDEX telemetry_by_time ON telemetry (tenant, device_id, received_at);
    CREATE INDEX telemetry_by_tenant_time ON telemetry (tenant, received_at);

    CREATE TABLE telemetry_state (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        watermark INTEGER NOT NULL,
        PRIMARY KEY (tenant, device_id)
    ) WITHOUT ROWID;

    CREATE TABLE telemetry_gaps (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        first INTEGER NOT NULL,
        last INTEGER NOT NULL,
        recorded_at REAL NOT NULL,
        PRIMARY KEY (tenant, device_id, first)
    ) WITHOUT ROWID;

    CREATE TABLE session_audits (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        operator TEXT NOT NULL,
        command TEXT,
        started_at REAL NOT NULL,
        ended_at REAL,
        bytes_in INTEGER NOT NULL DEFAULT 0,
        bytes_out INTEGER NOT NULL DEFAULT 0,
        reason TEXT
    );
    CREATE INDEX session_audits_by_tenant ON session_audits (tenant, id);

    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT NOT NULL,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        device_id TEXT,
        payload TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_tenant ON events (tenant, id);
    """,
    # 1 -> 2: the exit status of a terminal session's command
    """
    ALTER TABLE session_audits ADD COLUMN exit_status INTEGER;
    """,
    # 2 -> 3: telemetry moves to its own database file (TELEMETRY_MIGRATIONS), written by its
    # own thread, so bulk ingest never queues ahead of the control plane
    """
    DROP TABLE telemetry;
    DROP TABLE telemetry_state;
    DROP TABLE telemetry_gaps;
    """,
    # 3 -> 4: two label sets per device. ``labels`` is now written by operators only (the API)
    # and is what selectors match; ``reported_labels`` is what the device claims (hello,
    # Margo capabilities). Until now ``labels`` held a merge of device-reported and operator
    # labels that cannot be told apart, so all of it moves to ``reported_labels``: a device's
    # claim must not keep selector power. Operators re-assign their labels
    # (``margoctl label device``); ``--selector reported.k=v`` reaches the old values meanwhile.
    """
    ALTER TABLE devices ADD COLUMN reported_labels TEXT NOT NULL DEFAULT '{}';
    UPDATE devices SET reported_labels = labels, labels = '{}';
    """,
    # 4 -> 5: who authored each deployment version: the operator's signature envelope
    # (canonical JSON) and the digest of the operator's certificate (a blob). Null for versions
    # applied before operators signed: devices refuse those until an operator signs them.
    """
    ALTER TABLE deployments ADD COLUMN signature TEXT;
    ALTER TABLE deployments ADD COLUMN certificate TEXT;
    """,
    # 5 -> 6: the tenants' allow-lists (controller/allowlist.py): a device is admitted only
    # when (tenant, device_id) is here, ``allowed``, with its certificate's key (lowercase hex
    # SHA-256 of the DER SubjectPublicKeyInfo); ``not_after`` (unix seconds) is the expiry of
    # the newest certificate issued or seen for it. Revocation survives restarts here.
    """
    CREATE TABLE device_identities (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        key_sha256 TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('allowed', 'revoked')),
        not_after REAL NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (tenant, device_id)
    ) WITHOUT ROWID;
    """,
    # 6 -> 7: what a device may claim (controller/store/claims.py): every deployment a manifest
    # issued to the device, with the first version that listed it; filled from the manifests
    # already stored (all versions are kept). And indexes for retention by age
    # (controller/retention.py): events by time, terminal session audits by their end.
    """
    CREATE TABLE issued_deployments (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        deployment_id TEXT NOT NULL,
        first_version INTEGER NOT NULL,
        PRIMARY KEY (tenant, device_id, deployment_id)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO issued_deployments (tenant, device_id, deployment_id, first_version)
        SELECT m.tenant, m.device_id, json_extract(d.value, '$.deploymentId'), MIN(m.version)
        FROM (SELECT tenant, device_id, version, CAST(manifest AS TEXT) AS doc FROM manifests
              WHERE json_valid(CAST(manifest AS TEXT))) AS m,
             json_each(m.doc, '$.deployments') AS d
        WHERE json_type(d.value, '$.deploymentId') = 'text'
        GROUP BY m.tenant, m.device_id, json_extract(d.value, '$.deploymentId');
    CREATE INDEX events_by_ts ON events (ts);
    CREATE INDEX session_audits_by_end ON session_audits (ended_at);
    """,
    # 7 -> 8: rollouts (controller/rollouts/, controller/store/rollouts.py): the operator's
    # request and the state machine's state as JSON, the phase, a version for compare-and-set
    # saves, and the lease of the instance running it
    """
    CREATE TABLE rollouts (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        phase TEXT NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        owner TEXT,
        owner_until REAL,
        PRIMARY KEY (tenant, name)
    );
    CREATE INDEX rollouts_active ON rollouts (phase)
        WHERE phase IN ('running', 'paused', 'rolling-back');
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

# The telemetry database (``<name>.telemetry.db`` beside the main one). No foreign keys: the
# main store checks the device, which only a verified session or a scoped query can name.
TELEMETRY_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE telemetry (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        stream TEXT NOT NULL,
        received_at REAL NOT NULL,
        payload BLOB NOT NULL,
        PRIMARY KEY (tenant, device_id, seq)
    );
    CREATE INDEX telemetry_by_time ON telemetry (tenant, device_id, received_at);

    CREATE TABLE telemetry_state (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        watermark INTEGER NOT NULL,
        PRIMARY KEY (tenant, device_id)
    ) WITHOUT ROWID;

    CREATE TABLE telemetry_gaps (
        tenant TEXT NOT NULL,
        device_id TEXT NOT NULL,
        first INTEGER NOT NULL,
        last INTEGER NOT NULL,
        recorded_at REAL NOT NULL,
        PRIMARY KEY (tenant, device_id, first)
    ) WITHOUT ROWID;
    """,
    # 1 -> 2: retention (controller/retention.py). The bytes of each tenant's payloads, kept
    # by ingest and deletions (so the size cap never sums the table), and an index to find a
    # tenant's oldest records, by age or beyond its cap.
    """
    CREATE TABLE telemetry_usage (
        tenant TEXT PRIMARY KEY,
        bytes INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO telemetry_usage (tenant, bytes)
        SELECT tenant, SUM(length(payload)) FROM telemetry GROUP BY tenant;
    CREATE INDEX telemetry_by_tenant_received ON telemetry (tenant, received_at);
    """,
)


def _split(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def migrate(conn: sqlite3.Connection, path: str, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """Bring the database at ``conn`` to the last of ``migrations``; returns the version it had.

    Each migration runs in its own transaction together with the version bump, so a crash
    leaves the database at one version or the next. ``conn`` must be in autocommit mode.
    """
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    if row is None:
        conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        current = 0
    else:
        current = int(row[0])
    if current > len(migrations):
        raise StoreError(
            f"database {path} has schema version {current}, newer than this controller "
            f"supports ({len(migrations)}); upgrade margo-stream or use another database"
        )
    start = current
    for version in range(current, len(migrations)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split(migrations[version]):
                conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (version + 1,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return start
