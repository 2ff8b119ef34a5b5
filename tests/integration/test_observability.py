"""Metrics and OpenTelemetry end to end: a real Prometheus server (Debian's package) scrapes
the controller's and an agent's ``/metrics`` and its query API returns the connected devices
by tenant; device telemetry and the controller's metrics reach a real OTLP/HTTP receiver
(built on the official ``opentelemetry-proto`` definitions) with every record's tenant,
device and stream; a collector that never answers does not slow ingest."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from agent.telemetry.ingest import SOCKET_NAME
from margo_stream.telemetry_client import TelemetryClient
from tests.harness import Agent, Controller, wait_for
from tests.otlp_receiver import OtlpReceiver
from tests.prometheus_server import Prometheus, free_tcp_port

pytestmark = [pytest.mark.integration]


def scrape(port: int) -> str:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def emit(agent: Agent, stream: str, records: list[dict]) -> None:
    with TelemetryClient(agent.state / SOCKET_NAME, timeout=30.0) as client:
        for fields in records:
            client.emit(stream, fields)


def test_prometheus_scrapes_and_otlp_receives(pki, tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "1000")  # the SDK's, in ms
    mport, aport = free_tcp_port(), free_tcp_port()
    with OtlpReceiver() as otlp:
        ctl = Controller(
            pki,
            tmp_path / "data",
            extra=["--metrics", f"127.0.0.1:{mport}", "--otlp-endpoint", otlp.url],
        )
        press = Agent(
            pki.device("acme", "press-01"),
            ctl.quic,
            tmp_path / "press",
            extra=["--metrics", f"127.0.0.1:{aport}"],
        )
        line = Agent(pki.device("globex", "line-01"), ctl.quic, tmp_path / "line")
        try:
            ctl.wait_connected(pki.token("acme"), "press-01")
            ctl.wait_connected(pki.token("globex"), "line-01")
            text = scrape(mport)
            for name in (
                'margo_devices_connected{tenant="acme",transport="quic"} 1.0',
                'margo_devices_connected{tenant="globex",transport="quic"} 1.0',
                'margo_handshakes_total{transport="quic"} 2.0',
                "margo_push_duration_seconds_bucket",
                "margo_telemetry_records_total",
                "margo_event_loop_lag_seconds",
                "margo_push_window_limit 512.0",  # --push-window's default: nothing learnt yet
                "margo_push_window_in_flight 0.0",
                "margo_push_window_queued 0.0",
                'margo_listener_half_open{transport="quic"} 0.0',
                'margo_listener_events_total{event="accepted",transport="quic"} 2.0',
            ):
                assert name in text, name
            agent_text = wait_for(lambda: scrape(aport), what="the agent's /metrics")
            assert 'margo_agent_connected{transport="quic"} 1.0' in agent_text
            assert "margo_agent_buffer_fill_ratio" in agent_text
            assert "margo_agent_replay_lag_records" in agent_text

            targets = {"controller": f"127.0.0.1:{mport}", "agent": f"127.0.0.1:{aport}"}
            (tmp_path / "prom").mkdir()
            with Prometheus(tmp_path / "prom", targets) as prom:

                def connected() -> dict[str, float] | None:
                    got = {
                        r["metric"]["tenant"]: float(r["value"][1])
                        for r in prom.query("margo_devices_connected")
                    }
                    return got if got == {"acme": 1.0, "globex": 1.0} else None

                wait_for(connected, 30, 0.5, what=f"Prometheus' query\n{prom.log_tail()}")
                up = wait_for(
                    lambda: prom.query('margo_agent_connected{transport="quic"} == 1'),
                    30,
                    0.5,
                    what="the agent's metrics in Prometheus",
                )
                assert up[0]["metric"]["job"] == "agent"

            # device telemetry -> OTLP logs, each with tenant, device, stream (and seq)
            emit(press, "temperature", [{"celsius": 20 + i} for i in range(20)])
            emit(line, "vibration", [{"mm_s": 0.5}, {"mm_s": 0.7}])

            def received() -> list | None:
                recs = otlp.log_records()
                streams = [a.get("margo.stream") for _, a, _ in recs]
                ok = streams.count("temperature") == 20 and streams.count("vibration") == 2
                return recs if ok else None

            records = wait_for(received, 20, 0.2, what="telemetry at the OTLP receiver")
            owner = {"press-01": "acme", "line-01": "globex"}
            for resource, attributes, body in records:
                assert resource["service.name"] == "margo-device"
                assert resource["margo.tenant"] == owner[resource["device.id"]]
                assert resource["service.instance.id"] == resource["device.id"]
                assert isinstance(attributes["margo.stream"], str) and attributes["margo.stream"]
                assert isinstance(attributes["margo.seq"], int) and attributes["margo.seq"] >= 1
                if attributes["margo.stream"] == "temperature":
                    assert resource["device.id"] == "press-01" and "celsius" in body
                if attributes["margo.stream"] == "vibration":
                    assert resource["device.id"] == "line-01" and "mm_s" in body
            temps = sorted(
                b["celsius"] for _, a, b in records if a["margo.stream"] == "temperature"
            )
            assert temps == [20 + i for i in range(20)]

            # the controller's own metrics -> OTLP metrics
            def points() -> list | None:
                found = otlp.metric_points("margo_devices_connected")
                return found or None

            found = wait_for(points, 20, 0.2, what="controller metrics at the OTLP receiver")
            resource, labels, value = found[-1]
            assert resource["service.name"] == "margo-controller"
            assert {tuple(sorted(p[1].items())) for p in found} >= {
                (("tenant", "acme"), ("transport", "quic")),
                (("tenant", "globex"), ("transport", "quic")),
            }
            assert wait_for(lambda: otlp.metric_points("margo_telemetry_records"), 10, 0.2)
        finally:
            press.stop()
            line.stop()
            ctl.stop()


def test_a_collector_that_never_answers_does_not_slow_ingest(pki, tmp_path):
    blackhole = socket.socket()  # accepts connections (the kernel's backlog), never answers
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)
    mport = free_tcp_port()
    ctl = Controller(
        pki,
        tmp_path / "data",
        extra=[
            "--metrics",
            f"127.0.0.1:{mport}",
            "--otlp-endpoint",
            f"http://127.0.0.1:{blackhole.getsockname()[1]}",
        ],
    )
    agent = Agent(pki.device("acme", "press-01"), ctl.quic, tmp_path / "press")
    token = pki.token("acme")
    try:
        ctl.wait_connected(token, "press-01")
        started = time.monotonic()
        emit(agent, "load", [{"n": i} for i in range(500)])

        def stored() -> bool:
            r = ctl.get(token, "/devices/press-01/telemetry", stream="load", limit=1000)
            return r.status_code == 200 and len(r.json()["items"]) == 500

        wait_for(stored, 10, 0.05, what="the 500 records in the store")
        elapsed = time.monotonic() - started
        assert elapsed < 5.0, f"ingest took {elapsed:.1f}s with a dead collector"
        text = scrape(mport)
        total = next(
            float(ln.split()[-1])
            for ln in text.splitlines()
            if ln.startswith("margo_telemetry_records_total ")
        )
        assert total >= 500
    finally:
        agent.stop()
        stopping = time.monotonic()
        ctl.stop()
        blackhole.close()
    assert time.monotonic() - stopping < 5.0  # a dead collector does not hold the stop either
