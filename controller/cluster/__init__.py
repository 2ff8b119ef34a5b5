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

from controller.config import STORE_SCHEMES


def new_instance_id() -> str:
    """This controller process's id in the cluster: host, process and a random part (a
    restarted process is another instance)."""
    host = socket.gethostname().split(".")[0] or "controller"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


def is_postgres(store: str | None) -> bool:
    return store is not None and store.startswith(STORE_SCHEMES)


__all__ = ["is_postgres", "new_instance_id"]
