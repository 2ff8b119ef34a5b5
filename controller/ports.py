"""The small interfaces the controller's parts depend on.

Each feature (desired state, status, telemetry, terminals), the device sessions and the
operator API depend on these protocols, never on the controller object that assembles them:
``build_features`` (``controller/features.py``), called once by the ``Controller`` at start-up,
builds every part and passes each what it needs.
This module imports nothing of the controller, so anything may depend on it.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus
from cryptography import x509
from pydantic import BaseModel

from margo_stream.identity.spiffe import DeviceIdentity
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import StreamKind
from margo_stream.transport.channel_connection import ChannelConnection, MessageStream


class TaskSpawner(Protocol):
    """Runs background work in the controller's task group (failures are logged)."""

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...


class PeerCheck(Protocol):
    """Who a client certificate proves, or ``PeerRejected``: every device transport asks this.
    The controller's is ``controller.identities.Admission`` (chain, then the allow-list)."""

    def verify(
        self,
        leaf: x509.Certificate | None,
        chain: Sequence[x509.Certificate] = (),
        now: datetime | None = None,
    ) -> DeviceIdentity: ...

    def readmit(self, identity: DeviceIdentity, now: datetime | None = None) -> None:
        """``PeerRejected`` when an identity admitted earlier no longer is (its certificate
        expired, it was revoked): asked again on every request of a kept-alive connection."""
        ...


class DeviceLink(Protocol):
    """What a feature may use of one device's live, verified session."""

    @property
    def tenant(self) -> str: ...

    @property
    def device_id(self) -> str: ...

    @property
    def conn(self) -> ChannelConnection: ...

    @property
    def hello(self) -> m.Hello | None: ...

    def send_control(self, message: BaseModel) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


StreamHandler = Callable[[DeviceLink, MessageStream], None]
ReadyHook = Callable[[DeviceLink], Awaitable[None]]
CloseHook = Callable[[DeviceLink], None]


@dataclass(slots=True)
class SessionHooks:
    """Where the features plug into every device session: a handler per stream kind the agent
    opens, hooks run once a device's hello was answered, and hooks run when its connection
    ends."""

    stream_handlers: dict[StreamKind, StreamHandler] = field(default_factory=dict)
    ready: list[ReadyHook] = field(default_factory=list)
    closed: list[CloseHook] = field(default_factory=list)


class DesiredChanges(Protocol):
    """Told after an operator changed what devices should run (the change is stored);
    ``blobs``: what the change stored (its documents and files), which a push may need."""

    async def desired_changed(
        self, tenant: str, device_ids: list[str], *, blobs: Sequence[bytes] = ()
    ) -> None: ...


class DeviceNotifier(Protocol):
    """A device transport that wants to hear of changes at once (the HTTP/2 push pokes its
    subscribers; the Margo pull API has nothing to do)."""

    def notify(self, tenant: str, device_ids: list[str]) -> None: ...


StoredHook = Callable[[list[str]], None]


class DesiredPush(DesiredChanges, Protocol):
    """The QUIC push: it stores a change's manifests chunk by chunk and tells ``on_stored``
    of each chunk (after its own pushes to them were scheduled); also told of changes another
    controller of the cluster applied (the store has them; this process may have cached what
    they replaced)."""

    async def desired_changed(
        self,
        tenant: str,
        device_ids: list[str],
        *,
        blobs: Sequence[bytes] = (),
        on_stored: StoredHook | None = None,
    ) -> None: ...

    async def changed_elsewhere(self, tenant: str, device_ids: list[str]) -> None: ...

    async def resync(self) -> None:
        """Changes may have been missed: forget every cached manifest, catch devices up."""
        ...


DesiredPublisher = Callable[[str, list[str]], Awaitable[None]]


class DesiredChangeFanout:
    """The ``DesiredChanges`` the API is given: tells the QUIC push, then every other device
    transport that was added, then the other controllers of the cluster (``publish``), which
    push to the devices they hold (``changed_elsewhere``)."""

    def __init__(self, push: DesiredPush, publish: DesiredPublisher | None = None) -> None:
        self._push = push
        self._publish = publish
        self._notifiers: list[DeviceNotifier] = []

    def add(self, notifier: DeviceNotifier) -> None:
        self._notifiers.append(notifier)

    async def desired_changed(
        self, tenant: str, device_ids: list[str], *, blobs: Sequence[bytes] = ()
    ) -> None:
        told: set[str] = set()

        def stored(ids: list[str]) -> None:  # every transport hears of a chunk once it is stored
            told.update(ids)
            self._notify(tenant, ids)

        await self._push.desired_changed(tenant, device_ids, blobs=blobs, on_stored=stored)
        rest = [d for d in device_ids if d not in told]  # unchanged: told as before, at the end
        if rest:
            self._notify(tenant, rest)
        if self._publish is not None:
            await self._publish(tenant, device_ids)

    async def changed_elsewhere(self, tenant: str, device_ids: list[str]) -> None:
        await self._push.changed_elsewhere(tenant, device_ids)
        self._notify(tenant, device_ids)

    async def resync(self) -> None:
        await self._push.resync()

    def _notify(self, tenant: str, device_ids: list[str]) -> None:
        for notifier in self._notifiers:
            notifier.notify(tenant, device_ids)


# --- the cluster: several controllers on one store ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """Ownership of one device's session, cluster-wide. ``generation`` grows by one at every
    acquisition, whoever held it: a holder whose generation is no longer the stored one lost
    it (its renewals and release are refused). ``previous`` is the instance that held it
    before, when that was another one."""

    tenant: str
    device_id: str
    generation: int
    previous: str | None = None


@dataclass(frozen=True, slots=True)
class Holder:
    """Which controller instance holds a device's session, and over which carrier."""

    instance: str
    transport: str | None = None  # "quic" | "tcp"


class ChangeKind(enum.StrEnum):
    DESIRED = "desired"  # what the devices should run changed: push to those held here
    REPLACED = "replaced"  # devices now held elsewhere: close sessions of older generations
    REVOKED = "revoked"  # identities revoked: re-read them, close their sessions
    ALLOWED = "allowed"  # identities allowed (enrolled with a new key): re-read them
    RESYNC = "resync"  # (local only) changes may have been missed: drop cached state


@dataclass(frozen=True, slots=True)
class ClusterChange:
    """A change one controller tells the others. ``generations`` goes with ``devices`` for
    REPLACED (the lease each device has now); ``origin`` is the publishing instance."""

    kind: ChangeKind
    tenant: str
    devices: tuple[str, ...]
    generations: tuple[int, ...] = ()
    origin: str = ""


ChangeHandler = Callable[[ClusterChange], Awaitable[None]]
LeaseLost = Callable[[Lease], None]


class FleetView(Protocol):
    """Where devices are connected across the cluster."""

    async def holders(
        self, tenant: str, device_ids: Sequence[str] | None = None
    ) -> dict[str, Holder]:
        """device id -> the instance holding a valid lease on it, and the session's carrier (of
        ``device_ids``, or all of the tenant's)."""
        ...

    async def api_url(self, instance_id: str) -> str | None:
        """The operator API of ``instance_id`` while it is alive (what it announced)."""
        ...


class Cluster(FleetView, Protocol):
    """The controllers sharing one store. ``SingleNode`` is one process on SQLite: leases are
    in-process and there is nobody to tell; ``PgCluster`` keeps leases, an instance registry
    and change notifications in PostgreSQL."""

    @property
    def instance_id(self) -> str: ...

    @property
    def exclusive(self) -> bool:
        """This process is the only controller on its store (records of connections left by
        an earlier run can be cleared at start)."""
        ...

    async def open(self) -> None: ...

    async def run(
        self,
        on_change: ChangeHandler,
        on_lost: LeaseLost,
        *,
        task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
    ) -> None:
        """Heartbeats, lease renewals and change notifications until cancelled."""
        ...

    async def announce(self, api_url: str, quic_addr: str) -> None: ...

    async def close(self) -> None:
        """Release every lease this instance holds and leave the registry."""
        ...

    async def acquire(self, tenant: str, device_id: str, transport: str = "quic") -> Lease: ...

    async def release(self, lease: Lease) -> bool:
        """Whether ``lease`` was still this instance's (then it is released)."""
        ...

    def replaced(self, lease: Lease) -> None:
        """Tell the instance in ``lease.previous`` that it lost the device (batched)."""
        ...

    async def publish(self, change: ClusterChange) -> None: ...
