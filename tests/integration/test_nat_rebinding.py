"""NAT rebinding: mid-session the relay between agent and controller (tests/netrelay.py) moves
the agent's UDP flow to a new source port, as a NAT does when it forgets an idle mapping. The
QUIC connection carries on over the new path (aioquic's path validation): no new handshake, no
new session on the controller (connection count and connected-since unchanged, no second
"connected to" in the agent's log), and the channel keeps working both ways (telemetry up, a
command down) after the move."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from margo_stream.telemetry_client import TelemetryClient
from tests.harness import BIN, Agent, Controller, Pki, wait_for
from tests.netrelay import NetRelay

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def telemetry_count(ctl: Controller, token: str, device: str) -> int:
    r = ctl.get(token, f"/devices/{device}/telemetry", after=0, limit=1000)
    assert r.status_code == 200, r.text
    return len(r.json()["items"])


def test_a_nat_rebinding_keeps_the_same_session(pki: Pki, tmp_path: Path) -> None:
    ctl = Controller(pki, tmp_path / "data")
    token = pki.token("acme")
    host, port = ctl.quic.rsplit(":", 1)
    relay = NetRelay((host, int(port)), None).start()
    state = tmp_path / "agent"
    agent = Agent(
        pki.device("acme", "press-01"),
        f"127.0.0.1:{relay.port}",
        state,
        extra=["--keepalive", "0.5", "--commit-window-ms", "1"],
    )
    try:
        before = ctl.wait_connected(token, "press-01")
        wait_for(lambda: agent.status().get("transport") == "quic", what="status over QUIC")
        # the telemetry socket is opened beside the connection, not before it
        wait_for(lambda: (state / "telemetry.sock").exists(), what="the telemetry socket")
        client = TelemetryClient(state / "telemetry.sock")
        for n in range(20):
            client.emit("rebind", {"n": n, "phase": "before"})
        wait_for(lambda: telemetry_count(ctl, token, "press-01") == 20, what="20 records")
        [old_port] = relay.upstream_ports()

        [new_port] = relay.rebind()
        assert new_port != old_port
        rebound = time.monotonic()

        for n in range(20):
            client.emit("rebind", {"n": n, "phase": "after"})
        wait_for(
            lambda: telemetry_count(ctl, token, "press-01") == 40,
            timeout=15,
            what=f"40 records after the rebinding\n{agent.log()[-2000:]}",
        )
        run = subprocess.run(
            [str(BIN / "margoctl"), "--api", ctl.api, "--token-file", str(pki.token_file("acme"))]
            + ["exec", "press-01", "--", "sh", "-c", "echo still here"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (run.returncode, run.stdout) == (0, "still here\n"), run.stderr
        assert time.monotonic() - rebound < 20
        # keepalives cross the new path for a while: still the same session
        time.sleep(1.5)
        after = ctl.device(token, "press-01")
        assert after is not None and after["connected"]
        assert after["connection_count"] == before["connection_count"]
        assert after["connected_since"] == before["connected_since"]
        assert agent.log().count("connected to ") == 1, agent.log()
        assert relay.counters["rebinds"] == 1
    finally:
        agent.stop()
        relay.stop()
        ctl.stop()
