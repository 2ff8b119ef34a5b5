"""A real ``margo-controller --store postgresql://...`` with a real agent: an apply reaches
the device and its status comes back, telemetry is stored, and after the controller is
replaced by another one with an empty ``--data`` on the same database, the desired state and
the statuses are still there (they live in PostgreSQL, not in ``--data``) and the records
the agent buffered meanwhile are replayed, each stored once."""

from __future__ import annotations

import pytest

from margo_stream.telemetry_client import TelemetryClient
from tests.harness import Agent, Controller, traversable_to, wait_for
from tests.integration.test_desired import margoctl, state_of, workload_out, write_doc
from tests.integration.test_telemetry_e2e import fetch_all

pytestmark = pytest.mark.integration


def test_controller_on_postgresql_applies_reports_and_replays(pki, pg_dsn, tmp_path):
    token, tok = pki.token("acme"), pki.token_file("acme")
    ident = pki.device("acme", "press-01")
    ctl = Controller(pki, tmp_path / "data1", extra=["--store", pg_dsn])
    state = traversable_to(tmp_path / "agent1")
    agent = Agent(ident, ctl.quic, state, extra=["--keepalive", "0.5"])
    try:
        ctl.wait_connected(token, "press-01")
        doc = write_doc(tmp_path, "SITE-A")
        margoctl(ctl, tok, "apply", "-f", str(doc), "--device", "press-01")
        wait_for(
            lambda: (state_of(ctl, tok, "press-01", "probe-1") or {}).get("state") == "installed",
            what=f"installed\n{ctl.log_tail()}",
        )
        assert wait_for(lambda: workload_out(agent), what="workload output")[0] == "SITE-A"

        client = TelemetryClient(state / "telemetry.sock")
        online = client.emit_many("pg", ({"i": i} for i in range(200)))
        wait_for(lambda: len(fetch_all(ctl, token, "press-01")) >= 200, what="online records")
        quic_port = ctl.quic_port
        ctl.stop()
        offline = client.emit_many("pg", ({"i": i} for i in range(200, 500)))

        # another controller, nothing in its --data: everything comes from PostgreSQL
        ctl = Controller(pki, tmp_path / "data2", quic_port=quic_port, extra=["--store", pg_dsn])
        ctl.wait_connected(token, "press-01", min_connections=2, timeout=30)
        assert (state_of(ctl, tok, "press-01", "probe-1") or {}).get("state") == "installed"
        items = wait_for(
            lambda: (
                (got := fetch_all(ctl, token, "press-01")) and got[-1]["seq"] == offline[-1] and got
            ),
            timeout=30,
            what=f"replay\n{ctl.log_tail()}",
        )
        seqs = [i["seq"] for i in items if i["stream"] == "pg"]
        assert seqs == online + offline  # each once, in order
        assert [i["i"] for i in items if i["stream"] == "pg"] == list(range(500))
        for data in ("data1", "data2"):
            assert not (tmp_path / data / "controller.db").exists()
    finally:
        agent.stop()
        ctl.stop()
