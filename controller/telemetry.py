"""Telemetry ingest on the controller: store each batch durably, deduplicated by
(device, seq), then ack the highest contiguous sequence stored. Records the device dropped
(below the batch's ``oldest``) become a recorded gap, which moves the watermark past them and
raises an event operators see; the agent never waits on records that no longer exist.

What was stored is then offered to ``forward`` when one is set (``--otlp-endpoint``:
``controller.otlp_export``): a ``TelemetryForward`` takes the records without waiting and
never fails ingest, so a slow or dead collector cannot hold the device's acks back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import anyio

from controller.ports import DeviceLink, TaskSpawner
from controller.store.base import Store
from margo_stream.errors import NotFound, ProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.protocol.telemetry_ingest import IngestSession, RecordGap, SendAck
from margo_stream.transport.connection import MessageStream

log = logging.getLogger("margo.controller.telemetry")

YIELD_S = 0.003


class TelemetryForward(Protocol):
    """Where stored telemetry goes next; ``offer`` must not block or raise."""

    def offer(self, tenant: str, device_id: str, records: Sequence[tuple[int, str, bytes]]) -> None:
        """Take ``(seq, stream, payload)`` records of the device, already stored."""


class TelemetryIngest:
    def __init__(self, store: Store, tasks: TaskSpawner) -> None:
        self.store = store
        self.tasks = tasks
        self.counters = {"records": 0, "batches": 0, "duplicates": 0, "gaps": 0}
        self.forward: TelemetryForward | None = None  # --otlp-endpoint
        self.store_timer: Callable[[float], None] | None = None  # seconds each write took

    def handle(self, session: DeviceLink, stream: MessageStream) -> None:
        # one task per telemetry stream consumes it in order; the agent bounds what is in flight
        self.tasks.spawn(self._consume, session, stream)

    async def _consume(self, session: DeviceLink, stream: MessageStream) -> None:
        tenant, device = session.tenant, session.device_id
        try:
            writer = await self.store.telemetry_writer(tenant, device)  # the device, checked once
        except NotFound:
            log.warning("telemetry from %s/%s, which the store does not know", tenant, device)
            stream.reset(ErrorCode.PROTOCOL_ERROR)
            return
        ingest = IngestSession(await writer.watermark())
        while (batch := await stream.receive()) is not None:
            if not isinstance(batch, m.Telemetry):
                continue
            try:
                step = ingest.receive_batch(batch)
            except ProtocolError as exc:
                log.warning("bad telemetry batch from %s/%s: %s", tenant, device, exc)
                stream.reset(exc.code)
                return
            while not isinstance(step, SendAck):
                if isinstance(step, RecordGap):
                    watermark = await writer.record_gap(step.first, step.last)
                    self.counters["gaps"] += 1
                    _log_gap(tenant, device, step)
                    step = ingest.gap_recorded(watermark)
                else:
                    started = time.monotonic()
                    watermark = await writer.ingest(step.records)
                    if self.store_timer is not None:
                        self.store_timer(time.monotonic() - started)
                    if self.forward is not None:
                        self.forward.offer(tenant, device, step.records)
                    step = ingest.records_stored(watermark)
            self.counters["duplicates"] += step.duplicates
            self.counters["records"] += step.records
            self.counters["batches"] += 1
            if session.conn.closed is None:
                stream.send(m.TelemetryAck(seq=step.seq))
            # Ingest is the controller's lowest-priority work: a timer sleep (not a zero one)
            # lets every task that became ready meanwhile (pushes, statuses, terminal bytes) run
            # first. The agent's bounded in-flight window turns this into backpressure.
            await anyio.sleep(YIELD_S)


def _log_gap(tenant: str, device: str, gap: RecordGap) -> None:
    log.warning(
        "device %s/%s dropped telemetry %d..%d before it could be sent",
        tenant,
        device,
        gap.first,
        gap.last,
        extra={"event": "telemetry-gap", "first": gap.first, "last": gap.last},
    )
