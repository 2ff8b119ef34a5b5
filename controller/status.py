"""Deployment status events from devices: stored in Margo's deployment-status shape, acked by
sequence number once stored. The store keeps the newest status per deployment (an older or
repeated sequence number changes nothing) and turns state changes into operator events.

A status claiming a manifest version or a deployment never issued to the device is refused by
the store (``controller.store.claims``: logged with ``ErrorCode.STATUS_REFUSED``, not stored)
and still acked: the ``status_ack`` message has no error member, and both ends parse messages
strictly (an unknown member is an invalid message), so a refusal sent in a new member would
make agents of today reset their status stream and lose their session on every refusal. The
ack only tells the device to stop resending; what it claimed is never shown to operators."""

from __future__ import annotations

from typing import Any

from controller.batching import WriteBatcher
from controller.ports import DeviceLink, TaskSpawner
from controller.store.base import Store
from controller.store.claims import StatusRefusal
from margo_stream.protocol import messages as m
from margo_stream.protocol.status_wire import status_from_wire
from margo_stream.state.status import status_to_margo
from margo_stream.transport.connection import MessageStream


def margo_status(device_id: str, s: m.Status) -> dict[str, Any]:
    """A validated wire status as Margo's ``DeploymentStatus`` document (what the store keeps)."""
    return status_to_margo(device_id, status_from_wire(s))


class StatusIngest:
    """The handler of status streams: store each status (batched with the other devices'),
    then ack its sequence number."""

    def __init__(self, store: Store, tasks: TaskSpawner) -> None:
        self.tasks = tasks
        self._writes: WriteBatcher[tuple[str, str, dict[str, Any], int], bool | StatusRefusal] = (
            WriteBatcher(store.put_status_batch)
        )

    def handle(self, session: DeviceLink, stream: MessageStream) -> None:
        def on_message(message: Any) -> None:
            if isinstance(message, m.Status):
                self.tasks.spawn(self._store_and_ack, session, stream, message)

        stream.on_message = on_message

    async def _store_and_ack(self, session: DeviceLink, stream: MessageStream, s: m.Status) -> None:
        item = (session.tenant, session.device_id, margo_status(session.device_id, s), s.seq)
        await self._writes.submit(item)
        if session.conn.closed is None and not stream.ended:
            stream.send(m.StatusAck(seq=s.seq))
