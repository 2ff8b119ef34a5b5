"""The small interfaces the controller's parts depend on.

Each feature (desired state, status, telemetry, terminals), the device sessions and the
operator API depend on these protocols, never on the controller object that assembles them:
``build_features`` (``controller/features.py``), called once by the ``Controller`` at start-up,
builds every part and passes each what it needs.
This module imports nothing of the controller, so anything may depend on it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509
from pydantic import BaseModel

from margo_stream.identity.spiffe import DeviceIdentity
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import StreamKind
from margo_stream.transport.connection import Connection, MessageStream


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
    def conn(self) -> Connection: ...

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
    """Told after an operator changed what devices should run (the change is stored)."""

    async def desired_changed(self, tenant: str, device_ids: list[str]) -> None: ...


class DeviceNotifier(Protocol):
    """A device transport that wants to hear of changes at once (the HTTP/2 push pokes its
    subscribers; the Margo pull API has nothing to do)."""

    def notify(self, tenant: str, device_ids: list[str]) -> None: ...


class DesiredChangeFanout:
    """The ``DesiredChanges`` the API is given: tells the QUIC push, then every other device
    transport that was added."""

    def __init__(self, push: DesiredChanges) -> None:
        self._push = push
        self._notifiers: list[DeviceNotifier] = []

    def add(self, notifier: DeviceNotifier) -> None:
        self._notifiers.append(notifier)

    async def desired_changed(self, tenant: str, device_ids: list[str]) -> None:
        await self._push.desired_changed(tenant, device_ids)
        for notifier in self._notifiers:
            notifier.notify(tenant, device_ids)
