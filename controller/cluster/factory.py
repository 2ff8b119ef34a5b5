"""Which cluster a controller joins: ``SingleNode`` alone on SQLite, ``PgCluster`` on a shared
PostgreSQL store (kept out of the package's ``__init__``, which ``pg.py`` imports)."""

from __future__ import annotations

from controller.cluster import is_postgres
from controller.ports import Cluster


def open_cluster(store: str | None, instance_id: str) -> Cluster:
    """The cluster of a controller whose store is ``store`` (``--store``; None: SQLite)."""
    if is_postgres(store):
        from controller.cluster.pg import PgCluster

        assert store is not None
        return PgCluster(store, instance_id)
    from controller.cluster.single import SingleNode

    return SingleNode(instance_id)


__all__ = ["open_cluster"]
