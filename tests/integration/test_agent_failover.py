"""Agent failover over a list of controllers: real controller processes (each its own SQLite
data directory, one PKI, so every device is on both allow-lists), real agents over loopback
QUIC, ``--controller A,B``.

A controller killed with SIGKILL hands its device to the other within 10 s; several agents with
the same list spread over both (the shuffle is fixed by the hidden ``--controller-order-seed``
so the test knows where each must land); an unreachable controller first in the order costs one
connect timeout and no back-off, and a host name is dialled by its address with the TLS check
unchanged; a bad list is refused at start naming the entry.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from agent.backoff import Backoff
from agent.controller_list import ControllerOrder, order_rng, parse_controllers
from tests.harness import BIN, Agent, Controller, Pki, free_udp_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def order_of(device: str, seed: str, controllers: str) -> list[str]:
    """The entries of ``controllers`` in the order the agent of ``device`` tries them."""
    entries = parse_controllers(controllers)
    return [str(e) for e in ControllerOrder(entries, order_rng(device, seed), Backoff()).entries]


def holders(ctls: list[Controller], token: str, device: str) -> list[Controller]:
    return [c for c in ctls if (d := c.device(token, device)) and d["connected"]]


def test_a_killed_controller_hands_its_device_to_the_other(pki: Pki, tmp_path: Path) -> None:
    ctls = [Controller(pki, tmp_path / "a"), Controller(pki, tmp_path / "b")]
    token = pki.token("acme")
    ident = pki.device("acme", "press-01")
    listed = f"{ctls[0].quic},{ctls[1].quic}"
    agent = Agent(ident, listed, tmp_path / "agent", extra=["--keepalive", "0.5"])
    try:
        [holder] = wait_for(
            lambda: holders(ctls, token, "press-01"), what=f"a connection\n{agent.log()}"
        )
        [other] = [c for c in ctls if c is not holder]
        status = wait_for(lambda: (s := agent.status()).get("connected") and s)
        assert status["controller"] == holder.quic
        assert sorted(status["controllers"]) == sorted(listed.split(","))
        assert f"connected to {holder.quic} " in agent.log()

        holder.kill()
        killed = time.monotonic()
        other.wait_connected(token, "press-01", timeout=10)
        took = time.monotonic() - killed
        assert took < 10, took
        status = wait_for(
            lambda: (s := agent.status()).get("controller") == other.quic and s["connected"],
            timeout=5,
            what=f"status naming {other.quic}",
        )
        assert f"connected to {other.quic} " in agent.log()
        assert holders([other], token, "press-01") == [other]
    finally:
        agent.stop()
        for c in ctls:
            c.stop()


def test_agents_with_one_list_spread_over_both_controllers(pki: Pki, tmp_path: Path) -> None:
    ctls = [Controller(pki, tmp_path / "a"), Controller(pki, tmp_path / "b")]
    token = pki.token("acme")
    listed = f"{ctls[0].quic},{ctls[1].quic}"
    seed = "spread"
    # three devices whose order starts with each controller: found only if the order is shuffled
    lands: dict[str, Controller] = {}
    for ctl in ctls:
        picked = [
            d
            for d in (f"dev-{n:02d}" for n in range(64))
            if order_of(d, seed, listed)[0] == ctl.quic
        ][:3]
        assert len(picked) == 3, f"no shuffle: nothing starts with {ctl.quic}"
        lands.update(dict.fromkeys(picked, ctl))
    agents = [
        Agent(
            pki.device("acme", device),
            listed,
            tmp_path / device,
            extra=["--keepalive", "0.5", "--controller-order-seed", seed],
        )
        for device in lands
    ]
    try:
        for device, ctl in lands.items():
            ctl.wait_connected(token, device, timeout=30)
        for device, ctl in lands.items():
            assert holders(ctls, token, device) == [ctl], device
        assert {id(ctl) for ctl in lands.values()} == {id(c) for c in ctls}
    finally:
        for a in agents:
            a.stop()
        for c in ctls:
            c.stop()


def test_an_unreachable_first_controller_costs_no_back_off(pki: Pki, tmp_path: Path) -> None:
    ctl = Controller(pki, tmp_path / "a")
    token = pki.token("acme")
    dead = f"127.0.0.1:{free_udp_port()}"  # nothing answers there
    listed = f"{dead},localhost:{ctl.quic_port}"  # a name: resolved, dialled by address
    seed = next(
        s for s in (f"s{n}" for n in range(64)) if order_of("press-01", s, listed)[0] == dead
    )
    agent = Agent(
        pki.device("acme", "press-01"),
        listed,
        tmp_path / "agent",
        extra=["--connect-timeout", "1.5", "--controller-order-seed", seed],
    )
    try:
        ctl.wait_connected(token, "press-01", timeout=20)
        log = agent.log()
        before = log[: log.index("connected to")]
        assert f"no answer from {dead}" in before
        assert "reconnecting in" not in before  # straight on to the next, no back-off
        status = wait_for(lambda: (s := agent.status()).get("connected") and s)
        assert status["controller"] == f"localhost:{ctl.quic_port}"
        assert status["controller_address"] == ctl.quic  # the TLS name stayed the tenant's
    finally:
        agent.stop()
        ctl.stop()


def test_a_bad_controller_list_is_refused_at_start(pki: Pki, tmp_path: Path) -> None:
    ident = pki.device("acme", "press-01")
    for listed, named in [
        ("127.0.0.1:4433,,127.0.0.1:4434", "entry 2 is empty"),
        ("127.0.0.1:4433,127.0.0.1:99999", "'127.0.0.1:99999': port 99999 is out of range"),
        ("127.0.0.1:4433,127.0.0.1:4433", "entry 2 '127.0.0.1:4433' repeats entry 1"),
    ]:
        run = subprocess.run(
            [str(BIN / "margo-agent"), "--identity", str(ident), "--controller", listed]
            + ["--state", str(tmp_path / "state")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 2, run
        [line] = run.stderr.strip().splitlines()  # one line, naming the entry
        assert line.startswith("margo-agent: error: --controller") and named in line, line
