"""Small reads and writes on the event loop's own thread, beside the store's worker thread.

A hop to the worker thread and back costs about 200 us on this machine (a queue, a futex
wake of the worker, a wake of the loop through its self-pipe) where a point query costs 5-10
us and a small write transaction 30-60 us; a push's path from the apply to its ``installed``
status stored makes six such calls. ``LoopConnection`` is a second connection, used only
from the thread that opened the store (the event loop's), that runs the small ones at once.

Why that cannot stall the loop:
- a read never waits: in WAL mode a reader takes the last committed snapshot;
- a write never waits for the write lock: the connection has no busy timeout, so when the
  worker thread holds the lock (or, rarely, a checkpoint resets the log) the call answers
  ``BUSY`` at once and the store sends it to the worker thread as before;
- a commit does not fsync (``synchronous=NORMAL`` in WAL, as on the worker's connection: a
  commit survives a crash of the process; the log is synced at checkpoints) and this
  connection never checkpoints (``wal_autocheckpoint=0``): the worker thread does, after
  its own commits and when ``write`` reports that the log grew by ``CHECKPOINT_EVERY`` of
  ours;
- only calls bounded by an index and a few keys come here (the store decides which); scans of
  a tenant, large batches and large blobs stay on the worker thread.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Final, TypeVar

from controller.store.sqlite_errors import store_error
from controller.store.sqlite_events import StoreConnection

T = TypeVar("T")
log = logging.getLogger("margo.controller.store")


CHECKPOINT_EVERY = 200  # writes here between checkpoints asked of the worker thread


class Busy:
    """The answer of a call the loop's connection could not take now."""


BUSY: Final = Busy()


class LoopConnection:
    """A connection for one thread (the event loop's) that never waits."""

    def __init__(
        self,
        path: str,
        *,
        wake: Callable[[set[str]], None],
        checkpoint: Callable[[], None],
    ) -> None:
        """``wake(tenants)``: tell the waiters of these tenants' events (after a commit);
        ``checkpoint()``: ask the worker thread for a checkpoint (every CHECKPOINT_EVERY)."""
        self.path = path
        self._wake = wake
        self._checkpoint = checkpoint
        self._conn: StoreConnection | None = None
        self._thread = 0
        self.writes = 0  # writes committed here since the last checkpoint was asked for

    def open(self) -> None:
        """Open on the calling thread (the loop's); reads from any other thread get ``BUSY``."""
        conn = sqlite3.connect(
            f"file:{self.path}?mode=rw",
            uri=True,
            timeout=0.0,
            isolation_level=None,
            factory=StoreConnection,
        )
        assert isinstance(conn, StoreConnection)
        try:
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._thread = threading.get_ident()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def read(self, fn: Callable[..., T], *args: Any) -> T | Busy:
        """``fn(connection, *args)`` in one read transaction, or ``BUSY``."""
        return self._run("BEGIN", fn, args)

    def write(self, fn: Callable[..., T], *args: Any) -> T | Busy:
        """``fn(connection, *args)`` in one write transaction (all or nothing), or ``BUSY``
        when the write lock is taken. The waiters of the events it appended are woken."""
        result = self._run("BEGIN IMMEDIATE", fn, args)
        if isinstance(result, Busy):
            return result
        tenants = None if self._conn is None else self._conn.take_event_tenants()
        if tenants:
            self._wake(tenants)
        self.writes += 1
        if self.writes >= CHECKPOINT_EVERY:
            self.writes = 0
            self._checkpoint()
        return result

    def _run(self, begin: str, fn: Callable[..., T], args: tuple[Any, ...]) -> T | Busy:
        conn = self._conn
        if conn is None or threading.get_ident() != self._thread:
            return BUSY
        try:
            result = transaction(conn, begin, fn, *args)
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                return BUSY
            raise store_error(self.path, exc) from exc
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from exc
        return result


def _busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def transaction(conn: StoreConnection, begin: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(conn, *args)`` between ``begin`` and COMMIT; rolled back (and its events
    forgotten) when it raises."""
    conn.execute(begin)
    try:
        result = fn(conn, *args)
        conn.execute("COMMIT")
    except BaseException:
        conn.new_event_tenants.clear()
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def passive_checkpoint(conn: sqlite3.Connection | None) -> None:
    """A passive checkpoint on the worker's connection (the loop's never checkpoints)."""
    if conn is not None:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def log_checkpoint_failure(done: Future[None]) -> None:
    exc = done.exception()
    if exc is not None:
        log.warning("store checkpoint failed: %s", exc, extra={"event": "store-checkpoint"})
