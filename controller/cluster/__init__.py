"""Several controllers on one store (``controller.ports.Cluster``).

``SingleNode`` (``single.py``) is one process on SQLite; ``PgCluster`` (``pg.py``) shares a
PostgreSQL database with any number of other controller processes: device leases fenced by
generation (``leases.py``), changes told through LISTEN/NOTIFY with catch-up (``changes.py``).
``ClusterReactions`` (``reactions.py``) is what a controller does with the others' news.
"""

from __future__ import annotations

import os
import secrets
import socket

from controller.ports import Cluster


def new_instance_id() -> str:
    """This controller process's id in the cluster: host, process and a random part (a
    restarted process is another instance)."""
    host = socket.gethostname().split(".")[0] or "controller"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


def is_postgres(store: str | None) -> bool:
    return store is not None and store.startswith(("postgresql://", "postgres://"))


def open_cluster(store: str | None, instance_id: str) -> Cluster:
    """The cluster of a controller whose store is ``store`` (``--store``; None: SQLite)."""
    if is_postgres(store):
        from controller.cluster.pg import PgCluster

        assert store is not None
        return PgCluster(store, instance_id)
    from controller.cluster.single import SingleNode

    return SingleNode(instance_id)


__all__ = ["is_postgres", "new_instance_id", "open_cluster"]
