"""Live sessions, keyed by (tenant, device): at most one connection per identity.

A new connection from an identity that already has one replaces it: the registry hands back
the old session so the caller can close it with a clear reason. The registry holds in-memory
facts that change too often for the store (last keepalive); the store is updated in batches.

Each session carries the generation of its device's lease (``controller.ports.Lease``): a
session of an older generation never replaces a newer one. The registry knows this process's
sessions; ``holders`` adds where the rest of the cluster's devices are (``fleet``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.ports import DeviceLink, FleetView, Holder


@dataclass(slots=True)
class SessionView:
    tenant: str
    device_id: str
    remote: str
    connected_since: float  # unix time
    last_seen: float  # unix time of the last packet/keepalive we know of
    manifest_version: int | None = None
    handle: DeviceLink | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)
    generation: int = 0  # of the device's lease when this session was admitted
    transport: str | None = None  # the carrier of the session: "quic" or "tcp"
    # the connection's last-packet time (loop clock) that ``last_seen`` was last taken from and
    # handed to the store; None: not yet, or that write failed (the service's touch loop)
    stored_received: float | None = field(default=None, repr=False)


class SessionRegistry:
    def __init__(self, instance_id: str = "", fleet: FleetView | None = None) -> None:
        self._sessions: dict[tuple[str, str], SessionView] = {}
        self.instance_id = instance_id  # this controller's id in the cluster
        self.fleet = fleet  # the devices connected to other controllers, if any share the store

    def register(self, view: SessionView) -> SessionView | None:
        """Add ``view``; returns the session it replaces (the caller closes that one)."""
        key = (view.tenant, view.device_id)
        old = self._sessions.get(key)
        self._sessions[key] = view
        return old

    def unregister(self, view: SessionView) -> bool:
        """Remove ``view`` if it is still the current session of its identity."""
        key = (view.tenant, view.device_id)
        if self._sessions.get(key) is view:
            del self._sessions[key]
            return True
        return False

    def get(self, tenant: str, device_id: str) -> SessionView | None:
        return self._sessions.get((tenant, device_id))

    def link(self, tenant: str, device_id: str) -> DeviceLink | None:
        """The device's live session, if it has one whose connection is still open."""
        view = self._sessions.get((tenant, device_id))
        handle = view.handle if view is not None else None
        if handle is None or handle.conn.closed is not None:
            return None
        return handle

    def is_connected(self, tenant: str, device_id: str) -> bool:
        return (tenant, device_id) in self._sessions

    def newer(self, view: SessionView) -> SessionView | None:
        """The registered session of ``view``'s device when its lease is newer than
        ``view``'s (then ``view`` must not replace it)."""
        current = self._sessions.get((view.tenant, view.device_id))
        if current is not None and current.generation > view.generation:
            return current
        return None

    async def holders(
        self, tenant: str, device_ids: Sequence[str] | None = None
    ) -> dict[str, Holder]:
        """device id -> the controller instance holding its session and its carrier, across
        the cluster (the device's lease says; a session of this process is the answer when no
        lease does)."""
        found = dict(await self.fleet.holders(tenant, device_ids)) if self.fleet else {}
        if device_ids is None:
            local = list(self.of_tenant(tenant))
        else:
            local = [v for d in device_ids if (v := self._sessions.get((tenant, d))) is not None]
        for view in local:
            found.setdefault(view.device_id, Holder(self.instance_id, view.transport))
        return found

    async def held_elsewhere(self, tenant: str, device_id: str) -> tuple[str, str | None] | None:
        """(instance, its operator API URL) when another controller of the cluster holds the
        device's session; None when this one does or none does."""
        if self.fleet is None or self.is_connected(tenant, device_id):
            return None
        holder = (await self.fleet.holders(tenant, [device_id])).get(device_id)
        if holder is None or holder.instance == self.instance_id:
            return None
        return holder.instance, await self.fleet.api_url(holder.instance)

    def last_seen_changes(self, now_wall: float, now_loop: float) -> list[SessionView]:
        """The sessions whose connection received something since their last-seen time was
        last handed to the store, each ``last_seen`` set from its connection's last packet
        (``now_loop``: the connections' clock, at ``now_wall``) and marked as handed over."""
        changed = []
        for view in self._sessions.values():
            handle = view.handle
            if handle is None:
                continue
            received = handle.conn.last_received
            if received != view.stored_received:
                view.stored_received = received
                view.last_seen = now_wall - (now_loop - received)
                changed.append(view)
        return changed

    def last_seen_unstored(self, views: Sequence[SessionView]) -> None:
        """The store did not take these sessions' last-seen times: hand them over again next
        time."""
        for view in views:
            view.stored_received = None

    def touch(self, view: SessionView, now: float | None = None) -> None:
        view.last_seen = time.time() if now is None else now

    def of_tenant(self, tenant: str) -> Iterator[SessionView]:
        return (v for (t, _), v in list(self._sessions.items()) if t == tenant)

    def __iter__(self) -> Iterator[SessionView]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)
