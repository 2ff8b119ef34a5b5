"""The agent's TCP fallback with real processes: a controller listening on QUIC and on TCP
(``--tcp-listen``), a real agent, and between them a loopback relay (tests/netrelay.py) that
passes TCP and drops every UDP datagram, as a plant network that blocks UDP does.

- UDP blocked: the agent reaches the controller over TCP within 10 s (default
  ``--quic-timeout``), and apply, status, telemetry replay and exec all work; ``margoctl get
  device -o json`` and agent-status.json say ``"transport": "tcp"``.
- The same through a real HTTP proxy (a private tinyproxy with basic credentials, named by
  ``HTTPS_PROXY``), UDP still blocked: the tunnel is in the proxy's log.
- UDP restored: the probe (``--quic-retry 3``) finds QUIC and the agent moves back; telemetry
  produced all along is stored exactly once, and a push applied around the move arrives.
- A restart while UDP is still blocked goes straight to TCP (the remembered carrier).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from margo_stream.telemetry_client import TelemetryClient
from tests.harness import BIN, Agent, Controller, Pki, traversable_to, wait_for
from tests.integration.test_desired import state_of, workload_out, write_doc
from tests.netrelay import NetRelay
from tests.tinyproxy import Tinyproxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class Env:
    def __init__(self, pki: Pki, tmp: Path) -> None:
        self.pki = pki
        self.tmp = tmp
        self.ctl = Controller(pki, tmp / "data", extra=["--tcp-listen", "127.0.0.1:0"])
        info = json.loads((tmp / "data" / "controller.json").read_text())
        quic_host, quic_port = self.ctl.quic.rsplit(":", 1)
        tcp_host, tcp_port = str(info["tcp"]).rsplit(":", 1)
        self.relay = NetRelay((quic_host, int(quic_port)), (tcp_host, int(tcp_port))).start()
        self.token = pki.token("acme")
        self.token_file = pki.token_file("acme")
        self.agents: list[Agent] = []
        self.state = traversable_to(tmp / "agent")  # workloads run as nobody

    @property
    def controller(self) -> str:
        return f"127.0.0.1:{self.relay.port}"

    def agent(self, *extra: str, env: dict[str, str] | None = None) -> Agent:
        ident = self.pki.dir / "acme" / "devices" / "press-01"
        if not ident.exists():
            self.pki.device("acme", "press-01")
        agent = Agent(
            ident,
            self.controller,
            self.state,
            extra=["--keepalive", "0.5", "--commit-window-ms", "1", *extra],
            env=env or {},
        )
        self.agents.append(agent)
        return agent

    def margoctl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "margoctl"), "--api", self.ctl.api, "--token-file", str(self.token_file)]
            + list(args),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def device_json(self) -> dict[str, Any]:
        r = self.margoctl("get", "device", "press-01", "-o", "json")
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    def telemetry(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            r = self.ctl.get(self.token, "/devices/press-01/telemetry", after=after, limit=1000)
            assert r.status_code == 200, r.text
            items = r.json()["items"]
            if not items:
                return out
            out.extend(items)
            after = items[-1]["seq"]

    def stop(self) -> None:
        for a in self.agents:
            a.stop()
        self.relay.stop()
        self.ctl.stop()


@pytest.fixture
def env(pki: Pki, tmp_path: Path) -> Any:
    e = Env(pki, tmp_path)
    yield e
    e.stop()


def emit(state: Path, count: int, phase: str) -> None:
    client = TelemetryClient(state / "telemetry.sock")
    for n in range(count):
        client.emit("fallback", {"n": n, "phase": phase})


def test_udp_blocked_the_agent_works_over_tcp(env: Env, tmp_path: Path) -> None:
    env.relay.block_udp(True)
    started = time.monotonic()
    agent = env.agent()
    # records produced while the agent is still looking for a carrier: replayed over TCP
    wait_for(lambda: (env.state / "telemetry.sock").exists(), what="telemetry socket")
    emit(env.state, 30, "offline")
    env.ctl.wait_connected(env.token, "press-01", timeout=10)
    took = time.monotonic() - started
    assert took < 10, took
    # the controller may count the session a moment before the agent logs it
    wait_for(lambda: " over tcp" in agent.log(), what="agent log: connected ... over tcp")
    log = agent.log()
    assert "no answer from" in log and "over QUIC" in log, log
    assert env.device_json()["transport"] == "tcp"
    wait_for(lambda: agent.status().get("transport") == "tcp", what="agent status: tcp")
    assert env.relay.counters["udp_dropped"] > 0 and env.relay.counters["tcp_connections"] >= 1

    # telemetry: the replayed records and new ones, each exactly once
    emit(env.state, 30, "online")
    records = wait_for(lambda: len(got := env.telemetry()) >= 60 and got, what="60 records")
    keys = sorted((r["phase"], r["n"]) for r in records)
    assert keys == sorted([("offline", n) for n in range(30)] + [("online", n) for n in range(30)])

    # apply and status: a signed push over TCP, installed, reported back
    r = env.margoctl("apply", "-f", str(write_doc(tmp_path, "SITE-TCP")), "--device", "press-01")
    assert r.returncode == 0, r.stderr
    wait_for(
        lambda: (
            (state_of(env.ctl, env.token_file, "press-01", "probe-1") or {}).get("state")
            == "installed"
        ),
        what="installed over TCP",
    )
    site, _ = wait_for(lambda: workload_out(agent), what="workload output")
    assert site == "SITE-TCP"

    # exec: a terminal stream both ways
    r = env.margoctl("exec", "press-01", "--", "sh", "-c", "tr a-z A-Z", stdin="over tcp")
    assert (r.returncode, r.stdout) == (0, "OVER TCP"), r.stderr
    assert env.device_json()["transport"] == "tcp"


def test_udp_blocked_through_an_http_proxy(env: Env, tmp_path: Path) -> None:
    env.relay.block_udp(True)
    with Tinyproxy(tmp_path / "proxy", auth=("plant", "s3cret")) as proxy:
        url = f"http://plant:s3cret@127.0.0.1:{proxy.port}"
        agent = env.agent("--quic-timeout", "2", env={"HTTPS_PROXY": url, "NO_PROXY": ""})
        env.ctl.wait_connected(env.token, "press-01", timeout=15)
        assert env.device_json()["transport"] == "tcp"
        assert f"CONNECT 127.0.0.1:{env.relay.port}" in proxy.log() or (
            f"127.0.0.1:{env.relay.port}" in proxy.log()
        ), proxy.log()
        log = agent.log()
        assert f"through proxy {proxy.url}" in log, log
        assert "s3cret" not in log  # credentials never in the log
        r = env.margoctl("exec", "press-01", "--", "sh", "-c", "echo via proxy")
        assert (r.returncode, r.stdout) == (0, "via proxy\n"), r.stderr


def test_a_proxy_refusal_is_a_clear_error(env: Env, tmp_path: Path) -> None:
    env.relay.block_udp(True)
    with Tinyproxy(tmp_path / "proxy", auth=("plant", "s3cret")) as proxy:
        agent = env.agent("--quic-timeout", "1", "--proxy", proxy.url)  # no credentials
        wait_for(lambda: "it wants credentials" in agent.log(), timeout=15, what="a 407 in the log")
        status = wait_for(lambda: (s := agent.status()).get("last_error") and s)
        assert f"proxy {proxy.url}: refused CONNECT" in status["last_error"]
        assert status["connected"] is False


def test_udp_restored_the_agent_moves_back_to_quic_losing_nothing(env: Env, tmp_path: Path) -> None:
    env.relay.block_udp(True)
    agent = env.agent("--quic-timeout", "2", "--quic-retry", "3")
    before = env.ctl.wait_connected(env.token, "press-01", timeout=10)
    assert env.device_json()["transport"] == "tcp"
    r = env.margoctl("apply", "-f", str(write_doc(tmp_path, "SITE-A")), "--device", "press-01")
    assert r.returncode == 0, r.stderr

    # a producer writes telemetry the whole time, across the move
    acked: list[int] = []
    stop = threading.Event()

    def producer() -> None:
        client = TelemetryClient(env.state / "telemetry.sock")
        n = 0
        while not stop.is_set():
            acked.append(client.emit("move", {"n": n}))
            n += 1
            time.sleep(0.005)

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        env.relay.block_udp(False)
        # a push applied while the agent moves: it must arrive whichever carrier carries it
        r = env.margoctl("apply", "-f", str(write_doc(tmp_path, "SITE-B")), "--device", "press-01")
        assert r.returncode == 0, r.stderr
        wait_for(
            lambda: env.device_json()["transport"] == "quic",
            timeout=20,
            what=f"the move back to QUIC\n{agent.log()[-3000:]}",
        )
        assert "moving the session from TCP to QUIC" in agent.log()
        wait_for(lambda: agent.status().get("transport") == "quic", what="agent status: quic")
        time.sleep(1.0)  # more records over QUIC
    finally:
        stop.set()
        thread.join(10)
    wait_for(
        lambda: (
            (state_of(env.ctl, env.token_file, "press-01", "probe-1") or {}).get("state")
            == "installed"
            and (workload_out(agent) or ("", 0))[0] == "SITE-B"
        ),
        timeout=20,
        what="SITE-B installed",
    )
    assert len(acked) > 50
    records = wait_for(
        lambda: len(got := env.telemetry()) >= len(acked) and got, timeout=20, what="all records"
    )
    ns = [r["n"] for r in records]
    assert sorted(ns) == list(range(len(acked))), "a record lost or stored twice"
    after = env.ctl.device(env.token, "press-01")
    assert after is not None and after["connection_count"] == before["connection_count"] + 1


def test_a_restart_with_udp_still_blocked_goes_straight_to_tcp(env: Env) -> None:
    env.relay.block_udp(True)
    agent = env.agent("--quic-timeout", "3")
    env.ctl.wait_connected(env.token, "press-01", timeout=10)
    agent.stop()
    env.ctl.wait_connected(env.token, "press-01", connected=False)
    restarted = time.monotonic()
    again = env.agent("--quic-timeout", "3")
    env.ctl.wait_connected(env.token, "press-01", timeout=10)
    assert time.monotonic() - restarted < 3  # no QUIC wait this time
    assert "QUIC failed" in again.log()
    assert env.device_json()["transport"] == "tcp"
