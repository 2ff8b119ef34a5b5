"""The controller's Prometheus metrics (``--metrics HOST:PORT``: ``GET /metrics``).

Names follow Prometheus' conventions: the ``margo_`` prefix, ``_total`` on counters, base
units in the name (``_seconds``). Most values are read when scraped from what the controller
keeps anyway (the session registry, the features' counters), so nothing on the hot paths
changes for them; the rest are observed where they happen:

=================================================  =========  ==================================
metric                                             type       labels / what
=================================================  =========  ==================================
margo_devices_connected                            gauge      tenant, transport (quic, tcp)
margo_handshakes_total                             counter    transport: certificates checked
margo_handshake_refusals_total                     counter    transport, reason (no-certificate,
                                                              expired, not-yet-valid,
                                                              unknown-tenant, not-allowed,
                                                              revoked, untrusted, other)
margo_pushes_total                                 counter    desired-state pushes sent
margo_push_refusals_total                          counter    pushes the device refused
margo_push_duration_seconds                        histogram  a push's start to the device's
                                                              verdict (or its failure)
margo_status_events_total                          counter    status messages received
margo_telemetry_records_total                      counter    records stored
margo_telemetry_batches_total                      counter    batches stored
margo_telemetry_duplicates_total                   counter    records received again
margo_telemetry_gaps_total                         counter    gaps recorded (device dropped)
margo_terminal_sessions_total                      counter    outcome (opened, refused)
margo_terminal_sessions_active                     gauge      sessions open now
margo_store_operation_seconds                      histogram  operation (status, telemetry)
margo_event_loop_lag_seconds                       gauge      how late the last 0.5 s timer ran
margo_otlp_dropped_total                           counter    telemetry records not forwarded
                                                              (the OTLP queue was full)
margo_listener_events_total                        counter    transport (quic, tcp), event: what
                                                              the device listeners did before a
                                                              session (retries, half_open_dropped,
                                                              half_open_expired, stateless_resets,
                                                              tls_failed, ...)
margo_listener_half_open                           gauge      transport: handshakes in progress
=================================================  =========  ==================================
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.features import Features
from controller.registry import SessionRegistry
from margo_stream.errors import PeerRejected

LAG_INTERVAL = 0.5  # seconds between event-loop lag probes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# a refusal's reason text (margo_stream.identity.verify, controller.identities) -> its label
_REASONS = (
    ("no client certificate", "no-certificate"),
    ("not valid der", "no-certificate"),
    ("not yet valid", "not-yet-valid"),
    ("expired", "expired"),
    ("unknown trust domain", "unknown-tenant"),
    ("not-allowed", "not-allowed"),
    ("revoked", "revoked"),
    ("chain", "untrusted"),
    ("signature", "untrusted"),
)


def refusal_reason(exc: PeerRejected) -> str:
    """A bounded label for a refused certificate (the reason text is free-form)."""
    text = exc.reason.lower()
    for needle, label in _REASONS:
        if needle in text:
            return label
    return "other"


class Listener(Protocol):
    """A device listener's own tallies (``QuicServer``, ``TcpServer``)."""

    counters: dict[str, int]

    @property
    def half_open_now(self) -> int: ...


class _Snapshot(Collector):
    """What the controller keeps anyway, read at scrape time."""

    def __init__(self, registry: SessionRegistry, features: Features, otlp: Callable[[], int]):
        self.registry = registry
        self.features = features
        self.otlp_dropped = otlp
        self.listeners: dict[str, Listener] = {}  # by transport, once listening

    def collect(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "margo_devices_connected",
            "Devices connected to this controller, by tenant and transport",
            labels=["tenant", "transport"],
        )
        tally = Tally((v.tenant, v.transport or "quic") for v in self.registry)
        for (tenant, transport), n in sorted(tally.items()):
            connected.add_metric([tenant, transport], n)
        yield connected
        f = self.features
        desired, telemetry = f.desired.counters, f.telemetry.counters
        yield _counter("margo_pushes", "Desired-state pushes sent", desired["pushes"])
        yield _counter("margo_push_refusals", "Pushes the device refused", desired["refused"])
        yield _counter("margo_status_events", "Status messages received", f.status.received)
        for key, what in (
            ("records", "Telemetry records stored"),
            ("batches", "Telemetry batches stored"),
            ("duplicates", "Telemetry records received again (already stored)"),
            ("gaps", "Telemetry gaps recorded (records the device dropped)"),
        ):
            yield _counter(f"margo_telemetry_{key}", what, telemetry[key])
        sessions = CounterMetricFamily(
            "margo_terminal_sessions", "Terminal sessions by outcome", labels=["outcome"]
        )
        for outcome in ("opened", "refused"):
            sessions.add_metric([outcome], f.terminals.counters[outcome])
        yield sessions
        yield GaugeMetricFamily(
            "margo_terminal_sessions_active", "Terminal sessions open", len(f.terminals.active)
        )
        window = f.desired.window
        for name, what, value in (
            ("limit", "Pushes the window lets await an answer at once (learnt)", window.limit),
            ("in_flight", "Pushes awaiting their device's answer", window.in_flight),
            ("queued", "Pushes waiting for a place in the window", window.queued),
        ):
            yield GaugeMetricFamily(f"margo_push_window_{name}", what, value)
        yield _counter(
            "margo_otlp_dropped",
            "Telemetry records not forwarded to OTLP (its queue was full)",
            self.otlp_dropped(),
        )
        yield from self._listeners()

    def _listeners(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "margo_listener_events",
            "What the device listeners did before a session, by transport and event",
            labels=["transport", "event"],
        )
        half_open = GaugeMetricFamily(
            "margo_listener_half_open",
            "Device handshakes in progress (connection made, identity not yet checked)",
            labels=["transport"],
        )
        for transport, listener in sorted(self.listeners.items()):
            for event, n in sorted(listener.counters.items()):
                events.add_metric([transport, event], n)
            half_open.add_metric([transport], listener.half_open_now)
        yield events
        yield half_open


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class ControllerMetrics:
    """The controller's metrics registry and the instruments observed on the way."""

    def __init__(self, registry: SessionRegistry, features: Features) -> None:
        self.prom = CollectorRegistry(auto_describe=False)
        self.otlp_dropped: Callable[[], int] = lambda: 0  # set when --otlp-endpoint is on
        self.handshakes = Counter(
            "margo_handshakes",
            "Device certificates checked, by transport",
            ["transport"],
            registry=self.prom,
        )
        self.refusals = Counter(
            "margo_handshake_refusals",
            "Device certificates refused, by transport and reason",
            ["transport", "reason"],
            registry=self.prom,
        )
        self.push_seconds = Histogram(
            "margo_push_duration_seconds",
            "From a desired-state push's start to the device's verdict (or its failure)",
            buckets=LATENCY_BUCKETS,
            registry=self.prom,
        )
        self.store_seconds = Histogram(
            "margo_store_operation_seconds",
            "Store writes as the device waits for them, by operation",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.prom,
        )
        self.loop_lag = Gauge(
            "margo_event_loop_lag_seconds",
            f"How late the event loop ran the last {LAG_INTERVAL:g} s timer",
            registry=self.prom,
        )
        self._snapshot = _Snapshot(registry, features, lambda: self.otlp_dropped())
        self.prom.register(self._snapshot)
        # hooks into the features: observed where it happens
        features.desired.window.observe = self.push_seconds.observe
        features.status.store_timer = self.store_seconds.labels("status").observe
        features.telemetry.store_timer = self.store_seconds.labels("telemetry").observe

    def watch_listener(self, transport: str, listener: Listener) -> None:
        """Report ``listener``'s tallies as ``margo_listener_*{transport=...}``."""
        self._snapshot.listeners[transport] = listener

    def admitted(self, transport: str, verify: Callable[..., Any], *args: Any) -> Any:
        """``verify(*args)``, counted as a handshake of ``transport`` (and refusal, by reason)."""
        self.handshakes.labels(transport).inc()
        try:
            return verify(*args)
        except PeerRejected as exc:
            self.refusals.labels(transport, refusal_reason(exc)).inc()
            raise

    def render(self) -> bytes:
        return generate_latest(self.prom)

    async def run_lag_probe(self) -> None:
        """Measure how late a timer fires: the event loop's lag."""
        while True:
            start = time.monotonic()
            await anyio.sleep(LAG_INTERVAL)
            self.loop_lag.set(max(0.0, time.monotonic() - start - LAG_INTERVAL))


__all__ = ["ControllerMetrics", "refusal_reason"]
