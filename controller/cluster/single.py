"""``SingleNode``: one controller process alone on its store (SQLite), as before clusters.

Leases live in this process: every acquisition gets the next number of one counter, so a
device's sessions are ordered by generation like the cluster's; the session registry keeps one
session per device. There is nobody to tell of a change, so publishing does nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import anyio
from anyio.abc import TaskStatus

from controller.ports import ChangeHandler, ClusterChange, Holder, Lease, LeaseLost


class SingleNode:
    """``Cluster`` of one (see the module note)."""

    exclusive = True

    def __init__(self, instance_id: str) -> None:
        self._id = instance_id
        self._generations = itertools.count(1)

    @property
    def instance_id(self) -> str:
        return self._id

    async def open(self) -> None:
        pass

    async def run(
        self,
        on_change: ChangeHandler,
        on_lost: LeaseLost,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()

    async def announce(self, api_url: str, quic_addr: str) -> None:
        pass

    async def close(self) -> None:
        pass

    async def acquire(self, tenant: str, device_id: str, transport: str = "quic") -> Lease:
        return Lease(tenant, device_id, next(self._generations))

    async def release(self, lease: Lease) -> bool:
        return True  # the registry already knows it was the device's current session

    def replaced(self, lease: Lease) -> None:
        pass

    async def publish(self, change: ClusterChange) -> None:
        pass

    async def holders(
        self, tenant: str, device_ids: Sequence[str] | None = None
    ) -> dict[str, Holder]:
        return {}  # every session is in this process's registry

    async def api_url(self, instance_id: str) -> str | None:
        return None  # no other instance
