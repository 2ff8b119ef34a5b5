"""The agent's Prometheus metrics (``--metrics HOST:PORT``: ``GET /metrics``), read when
scraped from the telemetry buffer and the connect loop:

==========================================  =======  ===========================================
metric                                      type     what
==========================================  =======  ===========================================
margo_agent_connected                       gauge    1 while a session is up (label transport)
margo_agent_connects_total                  counter  sessions established
margo_agent_disconnects_total               counter  sessions lost
margo_agent_reconnects_total                counter  sessions established after the first
margo_agent_refusals_total                  counter  connections the controller refused
margo_agent_buffer_fill_ratio               gauge    telemetry buffer fill (0..1)
margo_agent_buffer_bytes                    gauge    bytes retained (``_max_bytes``: its bound)
margo_agent_buffer_records                  gauge    records retained
margo_agent_buffer_dropped_records_total    counter  dropped by the full-buffer policy
margo_agent_buffer_rejected_records_total   counter  refused by the full-buffer policy
margo_agent_buffer_corrupt_records_total    counter  found corrupt on disk
margo_agent_replay_lag_records              gauge    records not yet acknowledged by the
                                                     controller (the replay's backlog)
==========================================  =======  ===========================================
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.config import AgentConfig
from agent.ports import AgentSetup
from agent.service import Agent
from agent.telemetry.replay import TelemetryFeature
from margo_stream.metrics_http import MetricsServer


class _AgentCollector(Collector):
    def __init__(self, agent: Agent, telemetry: TelemetryFeature) -> None:
        self.agent = agent
        self.telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        up = GaugeMetricFamily(
            "margo_agent_connected", "1 while a session is up", labels=["transport"]
        )
        transport = agent.transport.value if agent.transport else "none"
        up.add_metric([transport], 1 if agent.session is not None else 0)
        yield up
        counters = agent.counters
        for key, what in (
            ("connects", "Sessions established"),
            ("disconnects", "Sessions lost"),
            ("refusals", "Connections the controller refused"),
        ):
            yield CounterMetricFamily(f"margo_agent_{key}", what, value=counters[key])
        yield CounterMetricFamily(
            "margo_agent_reconnects",
            "Sessions established after the first",
            value=max(0, counters["connects"] - 1),
        )
        buffer = self.telemetry.buffer
        if buffer is None:
            return
        st = buffer.stats()
        yield GaugeMetricFamily(
            "margo_agent_buffer_fill_ratio", "Telemetry buffer fill (0..1)", st.fill_ratio
        )
        yield GaugeMetricFamily("margo_agent_buffer_bytes", "Bytes retained", st.bytes_used)
        yield GaugeMetricFamily("margo_agent_buffer_max_bytes", "The buffer's bound", st.max_bytes)
        yield GaugeMetricFamily("margo_agent_buffer_records", "Records", st.records_retained)
        for key, value, what in (
            ("dropped", st.dropped_records, "Records dropped by the full-buffer policy"),
            ("rejected", st.rejected_records, "Records refused by the full-buffer policy"),
            ("corrupt", st.corrupt_records, "Records found corrupt on disk"),
        ):
            yield CounterMetricFamily(f"margo_agent_buffer_{key}_records", what, value=value)
        yield GaugeMetricFamily(
            "margo_agent_replay_lag_records",
            "Records not yet acknowledged by the controller",
            max(0, st.next_seq - 1 - st.acked_seq),
        )


def install(setup: AgentSetup, agent: Agent, telemetry: TelemetryFeature) -> None:
    """Serve ``GET /metrics`` on ``--metrics`` for the agent's whole life (when configured)."""
    config: AgentConfig = setup.config
    if config.metrics_host is None:
        return
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_AgentCollector(agent, telemetry))
    server = MetricsServer(lambda: generate_latest(registry))
    host, port = config.metrics_host, config.metrics_port

    async def serve() -> None:
        await server.serve(host, port)

    setup.background_tasks.append(serve)


__all__ = ["install"]
