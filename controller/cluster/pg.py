"""``PgCluster``: several controllers on one PostgreSQL store.

Each controller is an instance with its own id (``controller_instances``, a heartbeat every
``renew_every`` seconds that keeps it alive for ``lease_time``), holds the leases of the
devices whose sessions it accepted (``controller.cluster.leases``: taken at admission, alive
while the instance is, released at disconnect) and hears the others' changes
(``controller.cluster.changes``). It has its own connections, apart from the store's pool: a
small pool for leases and publishing and one connection that LISTENs, so neither waits behind
the other's work.

A lease this instance thought it held and the store says it does not was taken by another
instance: the controller is told (``on_lost``) and closes that session with ``REPLACED``.
Usually it heard sooner: the new holder publishes REPLACED for the devices it took from others,
in batches (``replaced``), as soon as it took them; the heartbeat's count check is the backstop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import anyio
import asyncpg
from anyio.abc import TaskStatus

from controller.cluster import changes, leases
from controller.cluster.pg_tables import create_tables
from controller.ports import ChangeHandler, ChangeKind, ClusterChange, Holder, Lease, LeaseLost
from margo_stream.errors import StoreError

log = logging.getLogger("margo.controller.cluster")

LEASE_TIME = 15.0  # seconds a lease lasts unless renewed
RENEW_EVERY = 5.0
PRUNE_EVERY = 300.0  # seconds between deletions of old changes
REPLACED_BATCH = 1000  # devices per published REPLACED change
REPLACED_GATHER = 0.05  # seconds replaced devices are gathered before they are published
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class PgCluster:
    """``Cluster`` on PostgreSQL (see the module note)."""

    exclusive = False

    def __init__(
        self,
        dsn: str,
        instance_id: str,
        *,
        lease_time: float = LEASE_TIME,
        renew_every: float = RENEW_EVERY,
        poll: float = 5.0,
    ) -> None:
        if renew_every * 2 >= lease_time:
            raise ValueError("leases must be renewed at least twice within their lifetime")
        self._dsn = dsn
        self._id = instance_id
        self.lease_time = lease_time
        self.renew_every = renew_every
        self.poll = poll
        self._pool: asyncpg.Pool | None = None
        self._held: dict[tuple[str, str], Lease] = {}
        self._replaced: dict[str, dict[str, int]] = {}  # tenant -> device -> generation
        self._replaced_wake: anyio.Event | None = None  # made in run (needs the event loop)
        self.feed: changes.ChangeFeed | None = None

    @property
    def instance_id(self) -> str:
        return self._id

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the cluster's connections are not open")
        return self._pool

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            self._dsn, timeout=5, server_settings={"application_name": f"margo {self._id}"}
        )

    # --- life ----------------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=4,
                timeout=5,
                command_timeout=10,
                server_settings={"application_name": f"margo {self._id}"},
            )
            async with self._pool.acquire() as conn:
                await create_tables(conn)
            await leases.heartbeat(self._pool, self._id, self.lease_time)
        except _DB_ERRORS as exc:
            await self.close()
            raise StoreError(
                f"cluster: cannot open its PostgreSQL connections: {_why(exc)}"
            ) from None

    async def announce(self, api_url: str, quic_addr: str) -> None:
        await self.db.execute(
            "INSERT INTO controller_instances (id, api_url, quic_addr) VALUES ($1, $2, $3)"
            " ON CONFLICT (id) DO UPDATE SET api_url = excluded.api_url,"
            " quic_addr = excluded.quic_addr, heartbeat_at = now()",
            self._id,
            api_url,
            quic_addr,
        )

    async def run(
        self,
        on_change: ChangeHandler,
        on_lost: LeaseLost,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        self.feed = changes.ChangeFeed(self._connect, self._id, on_change, poll=self.poll)
        self._replaced_wake = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(self.feed.run)
            tg.start_soon(self._maintain, on_lost)
            tg.start_soon(self._publish_replaced)
            task_status.started()

    async def close(self) -> None:
        """A clean stop: every lease released (the devices may connect elsewhere at once)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            with anyio.fail_after(5):
                released = await leases.release_all(pool, self._id)
                await pool.execute("DELETE FROM controller_instances WHERE id = $1", self._id)
                log.info("cluster: left, %d leases released", released)
        except (*_DB_ERRORS, TimeoutError) as exc:
            log.warning("cluster: could not release this instance's leases: %s", _why(exc))
        finally:
            self._held.clear()
            pool.terminate()

    # --- leases --------------------------------------------------------------------------------
    async def acquire(self, tenant: str, device_id: str, transport: str = "quic") -> Lease:
        try:
            lease = await leases.acquire(self.db, self._id, tenant, device_id, transport)
        except (*_DB_ERRORS, leases.LeaseError) as exc:
            raise StoreError(
                f"cannot take the lease of {tenant}/{device_id}: {_why(exc)}"
            ) from None
        self._held[(tenant, device_id)] = lease
        return lease

    async def release(self, lease: Lease) -> bool:
        key = (lease.tenant, lease.device_id)
        if self._held.get(key) == lease:
            del self._held[key]
        try:
            return await leases.release(self.db, self._id, lease)
        except _DB_ERRORS as exc:
            log.warning(
                "cluster: could not release %s/%s (it expires by itself): %s",
                lease.tenant,
                lease.device_id,
                _why(exc),
            )
            return False

    async def holders(
        self, tenant: str, device_ids: Sequence[str] | None = None
    ) -> dict[str, Holder]:
        try:
            return await leases.holders(self.db, tenant, device_ids)
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot read the device leases: {_why(exc)}") from None

    async def api_url(self, instance_id: str) -> str | None:
        try:
            url = await self.db.fetchval(
                "SELECT api_url FROM controller_instances WHERE id = $1 AND alive_until > now()",
                instance_id,
            )
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot read the controller instances: {_why(exc)}") from None
        return str(url) if url else None

    async def renew_now(self, on_lost: LeaseLost) -> int:
        """The heartbeat that keeps every lease held alive; ``on_lost`` for each one another
        instance took. Returns how many were lost."""
        held = list(self._held.values())
        await leases.heartbeat(self.db, self._id, self.lease_time)
        if not held or await leases.live_count(self.db, self._id) >= len(held):
            return 0  # the usual case: one row written, one integer read
        kept = await leases.live_leases(self.db, self._id)
        lost = 0
        for lease in held:
            key = (lease.tenant, lease.device_id)
            if (*key, lease.generation) not in kept and self._held.get(key) == lease:
                del self._held[key]
                lost += 1
                on_lost(lease)
        return lost

    async def _maintain(self, on_lost: LeaseLost) -> None:
        pruned_at = time.monotonic()
        while True:
            await anyio.sleep(self.renew_every)
            try:
                lost = await self.renew_now(on_lost)
                if time.monotonic() - pruned_at > PRUNE_EVERY:
                    pruned_at = time.monotonic()
                    await changes.prune(self.db)
                    # instances gone without a clean stop (killed, host lost)
                    await self.db.execute(
                        "DELETE FROM controller_instances"
                        " WHERE heartbeat_at < now() - make_interval(secs => $1)",
                        changes.KEEP,
                    )
            except (*_DB_ERRORS, StoreError) as exc:
                log.warning(
                    "cluster: no heartbeat for %d leases (they lapse within %.0fs): %s",
                    len(self._held),
                    self.lease_time,
                    _why(exc),
                    extra={"event": "lease-renewal-failed"},
                )
                continue
            if lost:
                log.info(
                    "cluster: %d devices were taken by other instances",
                    lost,
                    extra={"event": "leases-lost"},
                )

    # --- changes -------------------------------------------------------------------------------
    async def publish(self, change: ClusterChange) -> None:
        if change.origin != self._id:
            change = ClusterChange(
                change.kind, change.tenant, change.devices, change.generations, self._id
            )
        try:
            await changes.publish(self.db, change)
        except _DB_ERRORS as exc:
            raise StoreError(f"cannot publish a {change.kind} change: {_why(exc)}") from None

    def replaced(self, lease: Lease) -> None:
        if lease.previous is None:
            return
        self._replaced.setdefault(lease.tenant, {})[lease.device_id] = lease.generation
        if self._replaced_wake is not None:
            self._replaced_wake.set()

    async def _publish_replaced(self) -> None:
        while True:
            if not self._replaced:
                assert self._replaced_wake is not None
                await self._replaced_wake.wait()
            await anyio.sleep(REPLACED_GATHER)  # a reconnect storm: one change per batch
            self._replaced_wake = anyio.Event()
            pending, self._replaced = self._replaced, {}
            for tenant, devices in pending.items():
                items = list(devices.items())
                for start in range(0, len(items), REPLACED_BATCH):
                    chunk = items[start : start + REPLACED_BATCH]
                    change = ClusterChange(
                        ChangeKind.REPLACED,
                        tenant,
                        tuple(d for d, _ in chunk),
                        tuple(g for _, g in chunk),
                    )
                    try:
                        await self.publish(change)
                    except StoreError as exc:
                        # the old holders' renewals fail within the lease time: they close then
                        log.warning("cluster: %s", exc)
