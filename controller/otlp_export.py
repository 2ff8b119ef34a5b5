"""OpenTelemetry export (``--otlp-endpoint URL``): device telemetry as OTLP logs and the
controller's own metrics as OTLP metrics, over OTLP/HTTP (protobuf) with the official
OpenTelemetry SDK and exporter.

Mapping
-------
* Each stored telemetry record is one log record. Its **resource** is the device:
  ``service.name`` ``margo-device``, ``service.namespace`` and ``margo.tenant`` the tenant,
  ``device.id`` and ``service.instance.id`` the device id. Its **attributes** are
  ``margo.stream`` (the record's stream) and ``margo.seq`` (its sequence number on the
  device); its **body** is the record (a JSON or msgpack object as a map, any other JSON value
  as is, undecodable bytes as bytes); its timestamp is the record's ``ts`` (unix seconds)
  when it has one, the observed timestamp the moment it was stored.
* The controller's metrics (``controller.metrics``) go to ``/v1/metrics`` every
  ``OTEL_METRIC_EXPORT_INTERVAL`` ms (the SDK's variable; 60 s by default) under the resource
  ``service.name`` ``margo-controller``, ``service.instance.id`` the controller's instance id,
  with their Prometheus names and labels: counters as monotonic sums (without ``_total``),
  gauges as gauges, histograms as their ``_count`` and ``_sum`` sums.

Never in the way of ingest
--------------------------
``offer`` (the ``controller.telemetry.TelemetryForward`` port) runs on the event loop after
the store has the records: it appends them to a bounded queue (``MAX_QUEUED`` records; beyond
it they are counted in ``margo_otlp_dropped_total`` and logged once a minute) and returns. One
thread drains the queue, ``BATCH`` records per request, through the exporter, which retries
transient failures with backoff within its timeout; a batch that still fails is counted as
dropped. A dead or slow collector therefore costs a full queue and a counter, never an ack:
the store's copy is the one the API serves, whatever happens here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Any

import anyio
import msgpack
from opentelemetry._logs import LogRecord
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client.core import Metric

from controller.metrics import ControllerMetrics

log = logging.getLogger("margo.controller.otlp")

MAX_QUEUED = 100_000  # records waiting for the exporter
BATCH = 512  # records per export request
EXPORT_TIMEOUT = 5.0  # seconds per request, retries included
SNAPSHOT_S = 1.0  # how often the metrics snapshot the exporter reads is refreshed
RESOURCES = 10_000  # device resources kept (least recently used go first)
SCOPE = InstrumentationScope("margo-stream.telemetry")
Triple = tuple[int, str, bytes]


def decode_body(payload: bytes) -> Any:
    """A record's payload as an OTLP body: JSON or msgpack value, else the bytes."""
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        pass
    try:
        return msgpack.unpackb(payload, raw=False)
    except Exception:
        return payload


def _timestamp(body: Any) -> int | None:
    ts = body.get("ts") if isinstance(body, dict) else None
    if isinstance(ts, int | float) and not isinstance(ts, bool) and 0 < ts < 1e11:
        return int(ts * 1e9)
    return None


class OtlpExport:
    def __init__(self, endpoint: str, instance_id: str, metrics: ControllerMetrics) -> None:
        self.endpoint = endpoint
        self.metrics = metrics
        self.logs = OTLPLogExporter(endpoint=f"{endpoint}/v1/logs", timeout=EXPORT_TIMEOUT)
        self.dropped = 0
        self.exported = 0
        self._queue: deque[tuple[str, str, Sequence[Triple]]] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._stop = False
        self._resources: OrderedDict[tuple[str, str], Resource] = OrderedDict()
        self._last_drop_log = 0.0
        self._thread = threading.Thread(target=self._drain, name="otlp-export", daemon=True)
        # the controller's own metrics, read from a snapshot the event loop refreshes
        self._snapshot: list[Metric] = list(metrics.prom.collect())
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics", timeout=EXPORT_TIMEOUT)
        )
        own = Resource(
            {"service.name": "margo-controller", "service.instance.id": instance_id or "controller"}
        )
        self.meters = MeterProvider(resource=own, metric_readers=[reader])
        self._instruments(self._snapshot)
        metrics.otlp_dropped = lambda: self.dropped

    # --- the port (event loop) -------------------------------------------------------------------
    def offer(self, tenant: str, device_id: str, records: Sequence[Triple]) -> None:
        with self._cond:
            if self._queued + len(records) > MAX_QUEUED:
                self.dropped += len(records)
                now = time.monotonic()
                if now - self._last_drop_log > 60:
                    self._last_drop_log = now
                    log.warning(
                        "OTLP export queue full (%d records): dropping telemetry for %s "
                        "(the store has it; %d dropped so far)",
                        self._queued,
                        self.endpoint,
                        self.dropped,
                        extra={"event": "otlp-dropped"},
                    )
                return
            self._queue.append((tenant, device_id, records))
            self._queued += len(records)
            self._cond.notify()

    # --- running ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Start the export thread; refresh the metrics snapshot until cancelled."""
        self._thread.start()
        try:
            while True:
                self._snapshot = list(self.metrics.prom.collect())
                await anyio.sleep(SNAPSHOT_S)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.close)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self.meters.shutdown(timeout_millis=1000)
        self.logs.shutdown()

    # --- the export thread -----------------------------------------------------------------------
    def _take(self) -> list[tuple[str, str, Triple]] | None:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            out: list[tuple[str, str, Triple]] = []
            while self._queue and len(out) < BATCH:
                tenant, device, records = self._queue[0]
                room = BATCH - len(out)
                out.extend((tenant, device, r) for r in records[:room])
                if len(records) > room:
                    self._queue[0] = (tenant, device, records[room:])
                else:
                    self._queue.popleft()
            self._queued -= len(out)
            return out

    def _drain(self) -> None:
        while (batch := self._take()) is not None:
            try:
                result = self.logs.export([self._record(*item) for item in batch])
            except Exception:  # the exporter's own failures must not end the thread
                log.exception("OTLP log export failed")
                result = LogRecordExportResult.FAILURE
            if result is LogRecordExportResult.SUCCESS:
                self.exported += len(batch)
            else:
                with self._cond:
                    self.dropped += len(batch)

    def _resource(self, tenant: str, device_id: str) -> Resource:
        key = (tenant, device_id)
        found = self._resources.get(key)
        if found is not None:
            self._resources.move_to_end(key)
            return found
        found = self._resources[key] = Resource(
            {
                "service.name": "margo-device",
                "service.namespace": tenant,
                "service.instance.id": device_id,
                "margo.tenant": tenant,
                "device.id": device_id,
            }
        )
        if len(self._resources) > RESOURCES:
            self._resources.popitem(last=False)
        return found

    def _record(self, tenant: str, device_id: str, record: Triple) -> ReadableLogRecord:
        seq, stream, payload = record
        body = decode_body(payload)
        now = time.time_ns()
        return ReadableLogRecord(
            log_record=LogRecord(
                timestamp=_timestamp(body) or now,
                observed_timestamp=now,
                body=body,
                attributes={"margo.stream": stream, "margo.seq": seq},
            ),
            resource=self._resource(tenant, device_id),
            instrumentation_scope=SCOPE,
        )

    # --- metrics bridge --------------------------------------------------------------------------
    def _instruments(self, families: Iterable[Metric]) -> None:
        meter = self.meters.get_meter("margo-stream.controller")
        for family in families:
            if family.type == "histogram":
                for suffix in ("_count", "_sum"):
                    meter.create_observable_counter(
                        family.name + suffix,
                        [self._callback(family.name, family.name + suffix)],
                        description=family.documentation,
                    )
            elif family.type == "counter":
                meter.create_observable_counter(
                    family.name,
                    [self._callback(family.name, family.name + "_total")],
                    description=family.documentation,
                )
            elif family.type == "gauge":
                meter.create_observable_gauge(
                    family.name,
                    [self._callback(family.name, family.name)],
                    description=family.documentation,
                )

    def _callback(self, family: str, sample: str) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for fam in self._snapshot:
                if fam.name == family:
                    for s in fam.samples:
                        if s.name == sample:
                            yield Observation(s.value, dict(s.labels))

        return observe


__all__ = ["OtlpExport", "decode_body"]
