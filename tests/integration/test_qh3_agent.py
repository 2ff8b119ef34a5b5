"""The agent on qh3 (``--quic-stack qh3``) against the real controller (aioquic): real
processes, real certificates, real workloads. The same checks as the default stack's: the
controller's chain and name are verified by TLS, what its leaf claims after; a change applied
is verified, installed and reported; a restarted controller gets the device back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness import BIN, Agent, Controller, Pki, free_udp_port, wait_for
from tests.integration.test_controller_identity import _acme_device_as_server, _globex_issued
from tests.integration.test_desired import (  # noqa: F401 - env is a fixture
    env,
    margoctl,
    state_of,
    workload_out,
    write_doc,
)

pytestmark = [pytest.mark.integration]

QH3 = ["--quic-stack", "qh3"]


def test_a_qh3_agent_applies_changes_and_reports_them(env, tmp_path: Path) -> None:  # noqa: F811
    ctl, start_agent, tok = env
    agent = start_agent(extra=QH3)
    d = ctl.wait_connected(tok.read_text().strip(), "press-01")
    assert d["capabilities"]["id"] == "press-01"
    wait_for(lambda: "over quic (qh3)" in agent.log(), what=f"qh3 in the log\n{agent.log()}")
    assert agent.status()["controller_id"] == "spiffe://acme/margo/wfm/controller"
    margoctl(ctl, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-A")), "--device", "press-01")
    wait_for(
        lambda: (state_of(ctl, tok, "press-01", "probe-1") or {}).get("state") == "installed",
        what="installed",
    )
    site, pid1 = wait_for(lambda: workload_out(agent), what="workload output")
    assert site == "SITE-A"
    margoctl(ctl, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-B")), "--device", "press-01")
    site, pid2 = wait_for(
        lambda: (o := workload_out(agent)) and o[0] == "SITE-B" and o, what="restart"
    )
    assert pid2 != pid1
    wait_for(lambda: state_of(ctl, tok, "press-01", "probe-1")["manifestVersion"] == 2, what="v2")


@pytest.mark.parametrize(
    "replace",
    [_globex_issued, _acme_device_as_server],
    ids=["globex-issued", "device-certificate"],
)
def test_a_qh3_agent_refuses_a_controller_tls_does_not_verify(
    pki: Pki, tmp_path: Path, replace: object
) -> None:
    """Another tenant's CA issued the controller's certificate, or it lacks the tenant's DNS
    name: qh3's own chain and name check refuses it, the agent counts a refusal and connects
    nowhere."""
    replace(pki)  # type: ignore[operator]
    ctl = Controller(pki, tmp_path / "data")
    agent = Agent(pki.device("acme", "press-01"), ctl.quic, tmp_path / "agent", extra=QH3)
    try:
        wait_for(lambda: agent.status().get("refusals", 0) >= 2, what=f"refusals\n{agent.log()}")
        assert "refusing the controller at" in agent.log()
        status = agent.status()
        assert status["connects"] == 0 and status["controller_id"] is None
        assert ctl.get(pki.token("acme"), "/devices").json()["items"] == []
    finally:
        agent.stop()
        ctl.stop()


def test_a_qh3_agent_comes_back_after_a_controller_restart(pki: Pki, tmp_path: Path) -> None:
    port = free_udp_port()
    ctl = Controller(pki, tmp_path / "data", quic_port=port)
    agent = Agent(
        pki.device("acme", "press-01"),
        f"127.0.0.1:{port}",
        tmp_path / "agent",
        extra=[*QH3, "--keepalive", "1.0", "--idle-timeout", "5"],
    )
    try:
        ctl.wait_connected(pki.token("acme"), "press-01")
        ctl.kill()  # SIGKILL: no goodbye to the agent
        ctl = Controller(pki, tmp_path / "data", quic_port=port)
        d = ctl.wait_connected(pki.token("acme"), "press-01", min_connections=2, timeout=20)
        assert d["connection_count"] >= 2
        assert agent.alive()
    finally:
        agent.stop()
        ctl.stop()


def test_congestion_control_with_qh3_is_refused_at_start(pki: Pki, tmp_path: Path) -> None:
    ident = pki.device("acme", "press-01")
    run = subprocess.run(
        [
            str(BIN / "margo-agent"),
            "--identity",
            str(ident),
            "--controller",
            "127.0.0.1:4433",
            "--state",
            str(tmp_path / "agent"),
            *QH3,
            "--congestion-control",
            "rate",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0
    assert "--congestion-control rate applies to --quic-stack aioquic only" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_default_stack_is_qh3_and_congestion_control_selects_aioquic(
    pki: Pki, tmp_path: Path
) -> None:
    """No flag: qh3. ``--congestion-control`` alone (the interface from before there was a
    choice): aioquic, which that controller applies to."""
    ctl = Controller(pki, tmp_path / "data")
    plain = Agent(pki.device("acme", "press-01"), ctl.quic, tmp_path / "plain")
    cubic = Agent(
        pki.device("acme", "press-02"),
        ctl.quic,
        tmp_path / "cubic",
        extra=["--congestion-control", "cubic"],
    )
    try:
        ctl.wait_connected(pki.token("acme"), "press-01")
        ctl.wait_connected(pki.token("acme"), "press-02")
        wait_for(lambda: "over quic (qh3)" in plain.log(), what=f"qh3\n{plain.log()}")
        wait_for(lambda: "over quic (aioquic)" in cubic.log(), what=f"aioquic\n{cubic.log()}")
    finally:
        plain.stop()
        cubic.stop()
        ctl.stop()
