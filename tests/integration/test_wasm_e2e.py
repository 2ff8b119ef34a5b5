"""Wasm deployments end to end: margoctl apply (the module travels as a deployment file) ->
signed push over QUIC -> a real agent (root, workloads as nobody) running WASI guests on
wasmtime -> statuses back in ``margoctl get deployments``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wasmtime")

from tests.harness import Agent, Controller, traversable_to, wait_for  # noqa: E402
from tests.integration.test_desired import deployments, margoctl  # noqa: E402
from tests.unit.test_wasm_guests import GROW, PROBE, SPIN, TRAP, wasm_yaml  # noqa: E402

pytestmark = [pytest.mark.integration]

DEVICE = "wasm-01"


def write_wasm_doc(tmp: Path, dep: str, guest: str, props: str, extra: str = "") -> Path:
    """A wasm deployment ``dep`` of one component ``main``, its module ``<dep>.wat`` beside it."""
    module = tmp / f"{dep}.wat"
    module.write_text(guest)
    digest = "sha256:" + hashlib.sha256(module.read_bytes()).hexdigest()
    doc = tmp / f"{dep}.yaml"
    doc.write_text(wasm_yaml(dep, "main", f"{dep}.wat", digest, props, extra))
    return doc


@pytest.fixture
def fleet(pki, tmp_path):
    ctl = Controller(pki, tmp_path / "data")
    ident = pki.device("acme", DEVICE)
    agent = Agent(ident, ctl.quic, traversable_to(tmp_path / "agent"), extra=["--keepalive", "1"])
    yield ctl, agent, pki.token_file("acme")
    agent.stop()
    ctl.stop()


def main_component(ctl: Controller, tok: Path, dep: str, state: str) -> dict[str, Any] | None:
    for item in deployments(ctl, tok, DEVICE):
        if item["deploymentId"] == dep:
            comp = item["components"][0]
            return item if comp["state"] == state else None
    return None


def test_wasm_components_run_fail_and_restart_on_a_real_agent(fleet, tmp_path):
    ctl, agent, tok = fleet
    device = ctl.wait_connected(tok.read_text().strip(), DEVICE)
    caps = device["capabilities"]
    assert "wasm" in caps["supportedRuntimes"] and "wasm" in caps["supportedDeploymentTypes"]

    params = (
        "  parameters:\n    site:\n      value: SID-42\n"
        "      targets: [{pointer: ENV.SITE_ID, components: [main]}]\n"
    )
    docs = [
        write_wasm_doc(
            tmp_path,
            "counter",
            PROBE,
            "          args: [--out, result.txt, hello wasm]\n"
            "          env: {GREETING: hi}\n          restart: never",
            params,
        ),
        write_wasm_doc(tmp_path, "trapper", TRAP, "          restart: never"),
        write_wasm_doc(
            tmp_path, "hog", GROW, "          memoryLimit: 2Mi\n          restart: never"
        ),
        write_wasm_doc(
            tmp_path, "spinner", SPIN, "          fuel: 500000\n          restart: never"
        ),
        write_wasm_doc(
            tmp_path,
            "flaky",
            PROBE,
            "          args: [--fail, runs.txt]\n          restart: on-failure",
        ),
    ]
    for doc in docs:
        margoctl(ctl, tok, "apply", "-f", str(doc), "--device", DEVICE)

    work = agent.state / "work"
    done = wait_for(
        lambda: main_component(ctl, tok, "counter", "installed"), 30, what="counter installed"
    )
    assert done["state"] == "installed"
    out = work / "counter" / "main" / "result.txt"
    assert out.read_text().splitlines() == [
        "--out",
        "result.txt",
        "hello wasm",
        "GREETING=hi",
        "SITE_ID=SID-42",
    ]
    assert out.stat().st_uid != 0  # written by the guest, as the workload user

    def error_of(dep: str) -> dict[str, Any]:
        item = wait_for(lambda: main_component(ctl, tok, dep, "failed"), 30, what=f"{dep} failed")
        assert item["state"] == "failed"
        error = item["components"][0].get("error") or item.get("error")
        assert error, json.dumps(item)
        return error

    trap = error_of("trapper")
    assert trap["code"] == "trap" and "unreachable" in trap["message"], trap
    assert "about to trap" in (work / "trapper" / "main.log").read_text()
    hog = error_of("hog")
    assert hog["code"] == "memory-limit" and "memoryLimit 2 MiB" in hog["message"], hog
    spinner = error_of("spinner")
    assert spinner["code"] == "fuel-limit" and "fuel limit 500000" in spinner["message"], spinner
    # on-failure: the guest that exits 3 is run again and again
    wait_for(
        lambda: (work / "flaky" / "main" / "runs.txt").read_text().count("--fail") >= 3,
        30,
        what="flaky restarted",
    )
    flaky = error_of("flaky")
    assert flaky["code"] in ("exit-3", "crash-loop") and "status 3" in flaky["message"], flaky
    assert (work / "trapper" / "main.log").read_text().count("started pid") == 1  # never

    # deleting a deployment stops its guest; a busy one is killed at once
    margoctl(ctl, tok, "delete", "deployment", "flaky", "--device", DEVICE)
    wait_for(
        lambda: (
            not any(d["deploymentId"] == "flaky" for d in deployments(ctl, tok, DEVICE))
            or main_component(ctl, tok, "flaky", "removed")
        ),
        30,
        what="flaky removed",
    )
