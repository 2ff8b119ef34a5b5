"""PostgreSQL store, part: the event feed's methods and its waiters.

``wait_events`` callers are woken at once by a commit of this process (``PgStore._run`` calls
``_wake`` with the tenants a transaction appended events to), and by the notifications of
every process on the database (``NOTIFY margo_events, '<tenant>'``, sent by
``pg_events.events_sql`` and delivered at the commit) through one listening connection that
``_listen`` keeps open while the store is. A lost listener is reconnected; while it is away
waiters re-read every ``CATCH_UP`` seconds, and when it is back every waiter re-reads once,
so a missed notification delays an event, never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg

from controller.store import pg_events as events
from controller.store.base import EventRecord, JsonDict
from controller.store.pg_errors import is_store_failure
from controller.store.pg_events import EVENT_CHANNEL, Transactions

log = logging.getLogger("margo.controller.store")

CONNECT_TIMEOUT = 10.0
LISTEN_CHECK = 10.0  # seconds between health checks of the listening connection
CATCH_UP = 1.0  # wait_events re-reads this often while no listener is connected
CATCH_UP_LISTENING = 10.0  # and this often while one is


class PgEventFeed(Transactions):
    """The event methods of ``Store``; ``PgStore`` inherits them, and sets ``_dsn``,
    ``path``, ``_waiters`` and ``_listening`` and runs ``_listen`` while it is open."""

    _dsn: str
    path: str
    _waiters: dict[str, set[asyncio.Future[None]]]
    _listening: bool

    def _wake(self, tenants: set[str] | None = None) -> None:
        """Wake the waiters of ``tenants`` (all of them when None)."""
        keys = list(self._waiters) if tenants is None else tenants
        for tenant in keys:
            for fut in self._waiters.get(tenant, ()):
                if not fut.done():
                    fut.set_result(None)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._wake({str(payload)})

    async def _listen(self) -> None:
        """Keep one connection listening to ``EVENT_CHANNEL`` (until cancelled)."""
        delay = 0.5
        while True:
            try:
                conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT)
            except Exception as exc:
                if not is_store_failure(exc):
                    raise
                log.warning(
                    "event listener cannot connect to %s: %s; waiters poll meanwhile",
                    self.path,
                    exc,
                    extra={"event": "store-listener-down"},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.5
            try:
                await conn.add_listener(EVENT_CHANNEL, self._notified)
                self._listening = True
                self._wake()  # whatever was announced while nobody listened: catch up
                while not conn.is_closed():
                    await asyncio.sleep(LISTEN_CHECK)
                    await conn.fetchval("SELECT 1", timeout=LISTEN_CHECK)
            except Exception as exc:
                if not is_store_failure(exc):
                    raise
            finally:
                self._listening = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 1.0)

    async def add_event(
        self,
        tenant: str,
        kind: str,
        device_id: str | None = None,
        payload: JsonDict | None = None,
        *,
        now: float | None = None,
    ) -> int:
        when = time.time() if now is None else now
        return await self._write(events.add_event_now, tenant, kind, device_id, payload, when)

    async def list_events(
        self, tenant: str, after_id: int = 0, limit: int = 1000
    ) -> list[EventRecord]:
        return await self._read(events.list_events, tenant, after_id, limit)

    async def latest_event_id(self, tenant: str) -> int:
        return await self._read(events.latest_event_id, tenant)

    async def wait_events(
        self, tenant: str, after_id: int, *, timeout: float, limit: int = 1000
    ) -> list[EventRecord]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.setdefault(tenant, set())
            waiters.add(fut)
            try:
                # Registered before reading, so an event committed in between still wakes us.
                found = await self.list_events(tenant, after_id, limit)
                if found:
                    return found
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return []
                catch_up = CATCH_UP_LISTENING if self._listening else CATCH_UP
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, min(remaining, catch_up))
            finally:
                waiters.discard(fut)
                if not waiters and self._waiters.get(tenant) is waiters:
                    del self._waiters[tenant]
