"""SQLite failures as store errors that say what happened and what to do."""

from __future__ import annotations

import sqlite3

from margo_stream.errors import StoreError

_CORRUPT = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}
_BUSY = {"SQLITE_BUSY", "SQLITE_LOCKED"}


def store_error(path: object, exc: sqlite3.Error) -> StoreError:
    """The store error an operator can act on for a failed SQLite call on ``path``."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name == "SQLITE_FULL" or "disk is full" in text:
        return StoreError(f"database {path}: disk full ({text}); free space on its filesystem")
    if name in _CORRUPT or "not a database" in text or "malformed" in text:
        return StoreError(
            f"database {path} is corrupt or not a SQLite database ({text}); restore it"
            " from a backup or move it aside to start with an empty store"
        )
    if name in _BUSY or "locked" in text:
        return StoreError(f"database {path} is locked by another process ({text})")
    if name == "SQLITE_CANTOPEN" or "unable to open" in text:
        return StoreError(f"cannot open database {path} ({text})")
    if name == "SQLITE_READONLY" or "readonly" in text:
        return StoreError(f"database {path} is read-only ({text})")
    return StoreError(f"database {path}: {text}")
