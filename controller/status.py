"""Deployment status events from devices: stored in Margo's deployment-status shape, acked by
sequence number once stored. The store keeps the newest status per deployment (an older or
repeated sequence number changes nothing) and turns state changes into operator events.

A status claiming a manifest version or a deployment never issued to the device is refused by
the store (``controller.store.claims``: logged, not stored) and acked with ``code``
``STATUS_REFUSED`` and the reason, so the device stops resending it and can say why. Agents
whose hello predates these members (``proto`` below ``PROTO_STATUS_REFUSALS``) parse messages
strictly and would reset the stream on them: they get the plain ack."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from controller.batching import PartitionedBatcher
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


StatusItem = tuple[str, str, dict[str, Any], int]  # (tenant, device_id, status, seq)
StatusWriter = PartitionedBatcher[StatusItem, bool | StatusRefusal]


def _device_key(item: StatusItem) -> str:
    return f"{item[0]}\0{item[1]}"


@runtime_checkable
class ImmediateStatusWrites(Protocol):
    """A store that can often write a few statuses before returning (SQLite on the loop's own
    connection): a status then gets its ack in the loop turn that brought it."""

    def put_status_batch_now(
        self, items: Sequence[StatusItem], *, now: float | None = None
    ) -> list[bool | StatusRefusal] | None:
        """The statuses written before this returned, or ``None`` (nothing written)."""
        ...


def status_writer(store: Store, writers: int | None = None) -> StatusWriter:
    """The controller's status write path: ``writers`` batchers (default: the store's
    ``write_concurrency``) over ``store.put_status_batch``, devices hashed over them."""
    now = store.put_status_batch_now if isinstance(store, ImmediateStatusWrites) else None
    return PartitionedBatcher(
        store.put_status_batch,
        partitions=store.write_concurrency if writers is None else writers,
        key=_device_key,
        write_now=now,
    )


class StatusIngest:
    """The handler of status streams: store each status (batched with the other devices'),
    then ack its sequence number."""

    def __init__(self, store: Store, tasks: TaskSpawner) -> None:
        self.tasks = tasks
        self._writes = status_writer(store)
        self.received = 0  # status messages (metrics)
        self.store_timer: Callable[[float], None] | None = None  # seconds each store took

    def handle(self, session: DeviceLink, stream: MessageStream) -> None:
        def on_message(message: Any) -> None:
            if isinstance(message, m.Status):
                self.received += 1
                done, item = self._store_now(session, stream, message)
                if not done:
                    self.tasks.spawn(self._store_and_ack, session, stream, message, item)

        stream.on_message = on_message

    def _store_now(
        self, session: DeviceLink, stream: MessageStream, s: m.Status
    ) -> tuple[bool, StatusItem | None]:
        """``(True, _)``: stored and acked before returning (the store could take it at
        once); ``(False, item)``: nothing done, the asynchronous path stores ``item`` (None
        when it could not be made: the task makes it again and logs what failed)."""
        started = time.monotonic()
        item = None
        try:
            item = (session.tenant, session.device_id, margo_status(session.device_id, s), s.seq)
            done, result = self._writes.try_now(item)
        except Exception:  # noqa: BLE001 - the task tries again, and logs what failed
            return False, item
        if done:
            self._stored(session, stream, s, result, started)
        return done, item

    async def _store_and_ack(
        self, session: DeviceLink, stream: MessageStream, s: m.Status, item: StatusItem | None
    ) -> None:
        if item is None:
            item = (session.tenant, session.device_id, margo_status(session.device_id, s), s.seq)
        started = time.monotonic()
        self._stored(session, stream, s, await self._writes.submit(item), started)

    def _stored(
        self,
        session: DeviceLink,
        stream: MessageStream,
        s: m.Status,
        result: bool | StatusRefusal | None,
        started: float,
    ) -> None:
        if self.store_timer is not None:
            self.store_timer(time.monotonic() - started)
        if session.conn.closed is None and not stream.ended:
            stream.send(ack(session, s.seq, result))
            session.conn.transmit()  # now, not after whatever else this turn runs


def ack(session: DeviceLink, seq: int, result: bool | StatusRefusal | None) -> m.StatusAck:
    """The ack of a stored (or stale) status, or of a refused one: with the refusal for agents
    that read it."""
    hello = session.hello
    if not isinstance(result, StatusRefusal) or hello is None:
        return m.StatusAck(seq=seq)
    if hello.proto < m.PROTO_STATUS_REFUSALS:
        return m.StatusAck(seq=seq)
    return m.StatusAck(seq=seq, code=result.code, reason=result.describe()[:1024])
