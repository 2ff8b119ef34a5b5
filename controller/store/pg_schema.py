"""The PostgreSQL store's schema and its migrations.

Migrations are versioned (table ``schema_version``), idempotent and each runs in one
transaction. Every controller migrates at start while holding the transaction-scoped advisory
lock ``MIGRATION_LOCK_KEY``, so controllers starting at once migrate one after the other: the
second finds the schema current and does nothing. Other modules that keep their own tables in
the same database (the cluster's instances and leases) create them under the same key.
"""

from __future__ import annotations

# pg_advisory_xact_lock key shared by everything that creates tables in the store's database
# ("margo-mi" as a big-endian 64-bit integer; any fixed bigint would do).
MIGRATION_LOCK_KEY = int.from_bytes(b"margo-mi", "big", signed=True)
