"""Change notifications between the controllers of a cluster: LISTEN/NOTIFY with catch-up.

Theory of operation
-------------------
A change is a row of ``cluster_changes`` (a small JSON document: kind, tenant, devices,
generations, origin); the NOTIFY on ``CHANNEL`` that goes with it only says "look". Each
controller's ``ChangeFeed`` listens on its own connection and reads every row past the last id
it handled, in id order, when woken by a notification and every ``poll`` seconds anyway. So a
notification that never arrived (the listening connection dropped, PostgreSQL restarted) costs
a delay, never the change: after a reconnect the feed reads from its last id again.

Ids must become visible in increasing order for "past the last id" to be complete: publishers
take the transaction-scoped advisory lock ``CHANGES_LOCK_KEY`` before the row gets its id, and
hold it until their commit, all in one statement. Publishing is rare (operator changes,
revocations, batches of replaced sessions), so serializing it costs nothing that matters.

Rows older than ``KEEP`` are deleted now and then by every instance. A feed that could not read
for most of that time (its connection was down) reports ``RESYNC`` before it reads on: changes
meant for it may be gone, so its caches may be stale and it drops them.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus

from controller.cluster.leases import Db
from controller.cluster.pg_tables import CHANGES_LOCK_KEY, CHANNEL
from controller.ports import ChangeHandler, ChangeKind, ClusterChange
from margo_stream.errors import StoreError

log = logging.getLogger("margo.controller.cluster")

KEEP = 3600.0  # seconds a change stays readable
READ_BATCH = 500

_PUBLISH = f"""
WITH serial AS (SELECT pg_advisory_xact_lock({CHANGES_LOCK_KEY})),
row AS (INSERT INTO cluster_changes (payload) SELECT $1::jsonb FROM serial RETURNING id)
SELECT pg_notify('{CHANNEL}', id::text), id FROM row
"""


def encode(change: ClusterChange) -> str:
    doc: dict[str, Any] = {
        "kind": change.kind.value,
        "tenant": change.tenant,
        "devices": list(change.devices),
        "origin": change.origin,
    }
    if change.generations:
        doc["generations"] = list(change.generations)
    return json.dumps(doc, separators=(",", ":"))


def decode(payload: str) -> ClusterChange:
    """``ValueError`` for anything that is not a change we publish."""
    doc = json.loads(payload)
    if not isinstance(doc, dict):
        raise ValueError("a change is a JSON object")
    kind = ChangeKind(doc["kind"])
    devices = doc.get("devices", [])
    generations = doc.get("generations", [])
    if (
        not isinstance(doc.get("tenant"), str)
        or not isinstance(devices, list)
        or not all(isinstance(d, str) for d in devices)
        or not isinstance(generations, list)
        or not all(isinstance(g, int) for g in generations)
    ):
        raise ValueError("a change names a tenant, devices (strings) and generations (integers)")
    return ClusterChange(
        kind, doc["tenant"], tuple(devices), tuple(generations), str(doc.get("origin", ""))
    )


async def publish(db: Db, change: ClusterChange) -> int:
    """Store ``change`` and wake every listener; its id."""
    row = await db.fetchrow(_PUBLISH, encode(change))
    assert row is not None
    return int(row["id"])


async def prune(db: Db, keep: float = KEEP) -> None:
    await db.execute(
        "DELETE FROM cluster_changes WHERE at < now() - make_interval(secs => $1)", keep
    )


Connect = Callable[[], Awaitable[asyncpg.Connection]]


class ChangeFeed:
    """Reads the changes other instances publish and hands each to ``handler``, in order,
    at most once, skipping this instance's own."""

    def __init__(
        self,
        connect: Connect,
        instance_id: str,
        handler: ChangeHandler,
        *,
        poll: float = 5.0,
        retry: float = 1.0,
    ) -> None:
        self._connect = connect
        self.instance_id = instance_id
        self._handler = handler
        self.poll = poll
        self.retry = retry
        self.last_id: int | None = None  # None until the first connection: start from now
        self._wake = anyio.Event()
        self._read_at: float | None = None  # when everything up to last_id was read
        self.reconnects = 0
        self.handled = 0

    def poke(self, *_: object) -> None:
        """A notification arrived (asyncpg's listener callback): read now."""
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, catch up, repeat; reconnect (and catch up) whenever the connection fails."""
        started = False
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                lost = anyio.Event()
                conn.add_termination_listener(functools.partial(_ended, lost, self.poke))
                await conn.add_listener(CHANNEL, self.poke)
                await self._catch_up(conn)
                if not started:
                    started = True
                    task_status.started()
                while not lost.is_set():
                    with anyio.move_on_after(self.poll):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                    await self._catch_up(conn)
                log.warning(
                    "cluster change feed: the listening connection closed; reconnecting",
                    extra={"event": "cluster-feed-lost"},
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if not started:
                    raise StoreError(f"cluster change feed: cannot listen: {exc}") from None
                log.warning(
                    "cluster change feed: %s; reconnecting in %.1fs",
                    " ".join(str(exc).split()) or type(exc).__name__,
                    self.retry,
                    extra={"event": "cluster-feed-lost"},
                )
            finally:
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await _close(conn)
            self.reconnects += 1
            await anyio.sleep(self.retry)

    async def _catch_up(self, conn: asyncpg.Connection) -> None:
        now = anyio.current_time()
        if self.last_id is None:
            # first connection: the LISTEN is in place, so every change from here on is seen
            self.last_id = int(
                await conn.fetchval("SELECT coalesce(max(id), 0) FROM cluster_changes")
            )
        elif self._read_at is not None and now - self._read_at > KEEP * 0.8:
            # away long enough that changes meant for us may have been pruned unread
            await self._deliver(ClusterChange(ChangeKind.RESYNC, "", ()))
        while True:
            rows = await conn.fetch(
                "SELECT id, payload::text AS payload FROM cluster_changes"
                " WHERE id > $1 ORDER BY id LIMIT $2",
                self.last_id,
                READ_BATCH,
            )
            for row in rows:
                self.last_id = int(row["id"])
                try:
                    change = decode(row["payload"])
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("ignored cluster change %d: %s", self.last_id, exc)
                    continue
                if change.origin != self.instance_id:
                    await self._deliver(change)
            if len(rows) < READ_BATCH:
                break
        self._read_at = now

    async def _deliver(self, change: ClusterChange) -> None:
        self.handled += 1
        try:
            await self._handler(change)
        except Exception:
            log.exception("handling cluster change %s failed", change.kind)


def _ended(lost: anyio.Event, poke: Callable[[], None], _conn: object) -> None:
    lost.set()
    poke()


async def _close(conn: asyncpg.Connection) -> None:
    try:
        with anyio.fail_after(2):
            await conn.close()
    except Exception:  # noqa: BLE001 - the connection is gone either way
        conn.terminate()


__all__ = ["ChangeFeed", "KEEP", "decode", "encode", "prune", "publish"]
