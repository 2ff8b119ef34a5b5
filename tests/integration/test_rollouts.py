"""Rollouts end to end: margoctl rollout -> the controller's driver -> signed pushes over QUIC
-> real agents running real processes, step by step behind health gates."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import BIN, Agent, Controller, traversable_to, wait_for
from tests.integration.test_cluster import on, two  # noqa: F401, F811 - a fixture

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

DEVICES = ("press-01", "press-02", "press-03")
DOC = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {{applicationId: probe, id: probe-1}}
  name: probe
  namespace: test
spec:
  deploymentProfile:
    type: process
    components:
      - name: probe
        properties:
          command: ["sh", "-c", "{script}"]
          restart: on-failure
  parameters:
    site:
      value: {site}
      targets: [{{pointer: ENV.SITE_ID, components: [probe]}}]
"""
GOOD = 'echo \\"$SITE_ID $$\\" > out.tmp && mv out.tmp out && exec sleep 600'
BAD = "exit 3"  # a revision whose process exits at once


def write_doc(tmp: Path, site: str, script: str = GOOD) -> Path:
    path = tmp / f"probe-{site}.yaml"
    path.write_text(DOC.format(site=site, script=script))
    return path


class Fleet:
    def __init__(self, pki, tmp: Path) -> None:
        self.pki = pki
        self.tmp = tmp
        self.token_file = pki.token_file("acme")
        self.ctl = Controller(pki, tmp / "data")
        self.agents: dict[str, Agent] = {}
        for device in DEVICES:
            pki.device("acme", device)
            self.start_agent(device)

    def start_agent(self, device: str) -> Agent:
        ident = self.tmp / "certs" / "acme" / "devices" / device
        state = traversable_to(self.tmp / device)
        agent = Agent(ident, self.ctl.quic, state, extra=["--keepalive", "1"])
        self.agents[device] = agent
        return agent

    def restart_controller(self) -> None:
        self.ctl.stop(signal.SIGKILL)
        self.ctl = Controller(self.pki, self.tmp / "data", quic_port=self.ctl.quic_port)

    def margoctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [str(BIN / "margoctl"), "--api", self.ctl.api, "--token-file", str(self.token_file)]
            + list(args),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check:
            assert r.returncode == 0, r.stderr + self.ctl.log_tail()
        return r

    def rollout(self, name: str) -> dict:
        return json.loads(self.margoctl("get", "rollout", name, "-o", "json").stdout)

    def wait_state(self, name: str, *states: str, timeout: float = 60) -> dict:
        return wait_for(
            lambda: (r := self.rollout(name))["state"] in states and r,
            timeout,
            interval=0.2,
            what=f"rollout {name} {states}\n{self.ctl.log_tail()}",
        )

    def deployment(self, device: str) -> dict:
        items = json.loads(
            self.margoctl("get", "deployments", "--device", device, "-o", "json").stdout
        )
        return next(d for d in items if d["deploymentId"] == "probe-1")

    def workload(self, device: str) -> tuple[str, int] | None:
        try:
            out = self.agents[device].state / "work" / "probe-1" / "probe" / "out"
            site, pid = out.read_text().split()
            return site, int(pid)
        except (OSError, ValueError):
            return None

    def wait_running(self, device: str, site: str, timeout: float = 30) -> int:
        def check() -> int | None:
            out = self.workload(device)
            item = self.deployment(device)
            if out and out[0] == site and item["state"] == "installed":
                return out[1]
            return None

        return wait_for(check, timeout, what=f"{device} running {site}")

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.ctl.stop()


@pytest.fixture
def fleet(pki, tmp_path):
    """Three devices running revision SITE-A of probe-1."""
    f = Fleet(pki, tmp_path)
    try:
        token = f.token_file.read_text().strip()
        for device in DEVICES:
            f.ctl.wait_connected(token, device)
        f.margoctl(
            "apply",
            "-f",
            str(write_doc(tmp_path, "SITE-A")),
            *[a for d in DEVICES for a in ("--device", d)],
        )
        for device in DEVICES:
            f.wait_running(device, "SITE-A")
        yield f
    finally:
        f.stop()


def create(f: Fleet, name: str, doc: Path, *extra: str) -> None:
    f.margoctl(
        "rollout", "create", name, "-f", str(doc),
        *[a for d in DEVICES for a in ("--device", d)],
        *extra,
    )  # fmt: skip


def assigned_at(f: Fleet) -> dict[str, float]:
    """When each device was last assigned a new version of probe-1 (the event feed)."""
    events = json.loads(f.margoctl("get", "events", "--limit", "1000", "-o", "json").stdout)
    return {
        e["device"]: ts(e["ts"])
        for e in events
        if e["kind"] == "deployment.assigned" and e.get("device")
    }


def ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_good_revision_rolls_through_every_step_in_order(fleet, tmp_path):
    f = fleet
    create(
        f, "good", write_doc(tmp_path, "SITE-B"),
        "--steps", "1,50%,100%", "--max-failures", "0", "--healthy-for", "3s",
        "--step-timeout", "60s",
    )  # fmt: skip
    done = f.wait_state("good", "succeeded", "failed", "rolled-back")
    assert done["state"] == "succeeded", done
    steps = done["steps"]
    assert [len(s["devices"]) for s in steps] == [1, 1, 1]
    assert sorted(d for s in steps for d in s["devices"]) == sorted(DEVICES)
    for s in steps:
        assert s["result"] == "passed" and s["installed"] == 1 and s["failed"] == 0
    assigned = assigned_at(f)
    for k in range(len(steps) - 1):
        gate = ts(steps[k]["finished_at"])
        # step k passed its gate (3 s of installed) before step k+1 started ...
        assert gate - ts(steps[k]["started_at"]) >= 3.0
        assert ts(steps[k + 1]["started_at"]) >= gate
        # ... and no device of step k+1 was assigned the revision before that
        for device in steps[k + 1]["devices"]:
            assert assigned[device] >= gate - 0.01, (device, assigned[device], gate)
    for device in DEVICES:
        f.wait_running(device, "SITE-B")
    events = json.loads(f.margoctl("get", "events", "-o", "json").stdout)
    kinds = [e["kind"] for e in events if e["kind"].startswith("rollout.")]
    assert kinds[0] == "rollout.created" and kinds[-1] == "rollout.succeeded"
    assert kinds.count("rollout.step.passed") == 3
    table = f.margoctl("get", "rollouts").stdout
    assert "good" in table and "succeeded" in table


def test_bad_revision_stops_at_the_first_step_and_rolls_back(fleet, tmp_path):
    f = fleet
    before = {d: f.workload(d)[1] for d in DEVICES}
    create(
        f, "bad", write_doc(tmp_path, "SITE-X", BAD),
        "--steps", "1,50%,100%", "--max-failures", "0", "--healthy-for", "2s",
        "--step-timeout", "30s",
    )  # fmt: skip
    done = f.wait_state("bad", "rolled-back", "succeeded", "failed")
    assert done["state"] == "rolled-back", done
    first = done["steps"][0]["devices"]
    assert len(first) == 1 and done["steps"][0]["result"] == "failed"
    assert all(s["started_at"] is None for s in done["steps"][1:])
    assert [x["device"] for x in done["failures"]] == first
    assert "failed" in done["failures"][0]["reason"]
    # every device runs the previous revision again: the canary restarted it, the others
    # never stopped
    for device in DEVICES:
        pid = f.wait_running(device, "SITE-A")
        assert (pid == before[device]) is (device not in first)
    assert "ended rolled-back" in f.margoctl("rollout", "watch", "bad", check=False).stderr


def test_offline_devices_time_out_and_count_against_the_budget(fleet, tmp_path):
    f = fleet
    f.agents["press-03"].stop()
    f.ctl.wait_connected(f.token_file.read_text().strip(), "press-03", connected=False)
    create(
        f, "tolerant", write_doc(tmp_path, "SITE-B"),
        "--steps", "100%", "--max-failures", "1", "--healthy-for", "1s", "--step-timeout", "4s",
    )  # fmt: skip
    done = f.wait_state("tolerant", "succeeded", "failed", "rolled-back")
    assert done["state"] == "succeeded"
    assert [x["device"] for x in done["failures"]] == ["press-03"]
    assert "no installed status within 4s" in done["failures"][0]["reason"]
    create(
        f, "strict", write_doc(tmp_path, "SITE-C"),
        "--steps", "100%", "--max-failures", "0", "--healthy-for", "1s", "--step-timeout", "4s",
    )  # fmt: skip
    done = f.wait_state("strict", "rolled-back", "succeeded", "failed")
    assert done["state"] == "rolled-back", done
    assert [x["device"] for x in done["failures"]] == ["press-03"]
    for device in ("press-01", "press-02"):  # back to what they had before "strict"
        f.wait_running(device, "SITE-B")


def test_controller_restart_mid_rollout_resumes_it(fleet, tmp_path):
    f = fleet
    create(
        f, "resumed", write_doc(tmp_path, "SITE-B"),
        "--steps", "1,100%", "--healthy-for", "3s", "--step-timeout", "60s",
    )  # fmt: skip
    wait_for(
        lambda: f.rollout("resumed")["steps"][0]["installed"] == 1, 30, what="first step installed"
    )
    f.restart_controller()  # killed: no chance to release its lease or finish the step
    done = f.wait_state("resumed", "succeeded", "failed", "rolled-back")
    assert done["state"] == "succeeded", done
    assert ts(done["steps"][1]["started_at"]) >= ts(done["steps"][0]["finished_at"])
    for device in DEVICES:
        f.wait_running(device, "SITE-B")


def test_pause_resume_abort(fleet, tmp_path):
    f = fleet
    create(
        f, "held", write_doc(tmp_path, "SITE-B"),
        "--steps", "1,100%", "--healthy-for", "4s", "--step-timeout", "60s",
    )  # fmt: skip
    assert "paused" in f.margoctl("rollout", "pause", "held").stdout
    time.sleep(5)  # longer than the gate: while paused no step may start
    held = f.rollout("held")
    assert held["state"] == "paused" and held["steps"][1]["started_at"] is None
    again = f.margoctl("rollout", "pause", "held", check=False)
    assert again.returncode == 1 and "not running" in again.stderr
    f.margoctl("rollout", "resume", "held")
    wait_for(
        lambda: f.rollout("held")["steps"][1]["started_at"] is not None, 30, what="second step"
    )
    out = json.loads(f.margoctl("rollout", "abort", "held", "-o", "json").stdout)
    assert out["state"] in ("rolling-back", "rolled-back")
    done = f.wait_state("held", "rolled-back")
    assert done["reason"] == "aborted"
    for device in DEVICES:
        f.wait_running(device, "SITE-A")


def test_a_device_joining_the_selector_gets_the_current_phase(fleet, tmp_path):
    f = fleet
    for device in ("press-01", "press-02"):
        f.margoctl("label", "device", device, "line=1")
    f.margoctl(
        "rollout", "create", "joined", "-f", str(write_doc(tmp_path, "SITE-B")),
        "--selector", "line=1", "--steps", "1,100%", "--healthy-for", "3s",
        "--step-timeout", "60s",
    )  # fmt: skip
    assert f.rollout("joined")["targets"] == ["press-01", "press-02"]
    f.margoctl("label", "device", "press-03", "line=1")  # joins while the first step runs
    done = f.wait_state("joined", "succeeded", "failed", "rolled-back")
    assert done["state"] == "succeeded", done
    assert "press-03" in done["targets"]
    # it joined the step under way (the first, unless that passed its gate meanwhile)
    assert [s["devices"][-1] == "press-03" for s in done["steps"]].count(True) == 1
    for device in DEVICES:
        f.wait_running(device, "SITE-B")


def test_on_postgresql_one_instance_runs_a_rollout_any_instance_commands(two, pki, tmp_path):  # noqa: F811
    from tests.integration.test_desired import margoctl

    controller, agent = two
    a, b = controller("a"), controller("b")
    token, tok = pki.token("acme"), pki.token_file("acme")
    agent("on-a", a.quic)
    agent("on-b", b.quic)
    on(a, token, "on-a", a)
    on(a, token, "on-b", b)
    targets = ["--device", "on-a", "--device", "on-b"]
    margoctl(a, tok, "apply", "-f", str(write_doc(tmp_path, "SITE-A")), *targets)

    def states(ctl: Controller, name: str) -> dict:
        return json.loads(margoctl(ctl, tok, "get", "rollout", name, "-o", "json").stdout)

    margoctl(
        b, tok, "rollout", "create", "pg", "-f", str(write_doc(tmp_path, "SITE-B")), *targets,
        "--steps", "1,100%", "--healthy-for", "1s", "--step-timeout", "30s",
    )  # fmt: skip
    margoctl(a, tok, "rollout", "pause", "pg")  # through the other instance's API
    assert states(b, "pg")["state"] == "paused"
    margoctl(a, tok, "rollout", "resume", "pg")
    done = wait_for(
        lambda: (r := states(a, "pg"))["state"] in ("succeeded", "failed", "rolled-back") and r,
        60,
        interval=0.2,
        what=f"rollout pg ended\n{a.log_tail()}\n{b.log_tail()}",
    )
    assert done["state"] == "succeeded", done
    owner = done["owner"]
    runner, other = (a, b) if owner == a.instance else (b, a)  # type: ignore[attr-defined]
    assert owner == runner.instance  # type: ignore[attr-defined]
    assert "rollout acme/pg: 1 device(s) assigned" in runner.log()
    assert "rollout acme/pg:" not in other.log()
    for device in ("on-a", "on-b"):
        wait_for(
            lambda d=device: any(
                i["deploymentId"] == "probe-1" and i["state"] == "installed"
                and i["manifestVersion"] == 2
                for i in json.loads(
                    margoctl(a, tok, "get", "deployments", "--device", d, "-o", "json").stdout
                )
            ),
            30,
            what=f"{device} installed the rollout's revision",
        )  # fmt: skip
