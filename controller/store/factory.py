"""Which store a controller uses: SQLite in ``--data`` (the default), or PostgreSQL when
``--store`` names a ``postgresql://`` DSN (``ControllerConfig.store``, validated there)."""

from __future__ import annotations

from typing import Protocol

from controller.config import ControllerConfig
from controller.retention import RetentionStore
from controller.store.base import Store


class ControllerStore(Store, RetentionStore, Protocol):
    """What the controller needs of its store: the ``Store`` and retention's deletions."""


def open_store(config: ControllerConfig) -> ControllerStore:
    """The store ``config`` asks for, not opened yet (the controller opens it at start)."""
    if config.store is None:
        from controller.store.sqlite import SqliteStore

        return SqliteStore(config.db_path)
    from controller.store.pg import PgStore

    return PgStore(config.store)
