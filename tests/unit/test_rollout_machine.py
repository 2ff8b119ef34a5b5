"""The rollout state machine, sans-IO: steps in order behind their gates, the budget, the
step timeout, restarts, pause/resume/abort, joiners, and its state surviving a JSON round
trip (what the store keeps)."""

from __future__ import annotations

import json

import pytest

from controller.rollouts.machine import (
    Assign,
    Emit,
    Observation,
    Phase,
    Restore,
    RolloutMachine,
    RolloutStateError,
)
from controller.rollouts.spec import (
    Amount,
    RolloutSpec,
    RolloutSpecError,
    parse_duration,
    parse_steps,
)
from margo_stream.state.status import DeploymentState

INSTALLED = DeploymentState.INSTALLED
FAILED = DeploymentState.FAILED


def spec(
    steps: str = "1,50%,100%",
    max_failures: str = "0",
    healthy_for: float = 3.0,
    step_timeout: float = 60.0,
    auto_rollback: bool = True,
    devices: tuple[str, ...] = ("d1", "d2", "d3", "d4"),
) -> RolloutSpec:
    return RolloutSpec(
        name="r1",
        deployment_id="dep",
        digest="sha256:new",
        steps=parse_steps(steps),
        max_failures=Amount.parse(max_failures, what="max-failures"),
        healthy_for=healthy_for,
        step_timeout=step_timeout,
        auto_rollback=auto_rollback,
        devices=devices,
    )


def roundtrip(m: RolloutMachine) -> RolloutMachine:
    return RolloutMachine.from_json(m.spec, json.loads(json.dumps(m.to_json())))


def assigns(actions) -> list[tuple[str, ...]]:
    return [a.devices for a in actions if isinstance(a, Assign)]


def kinds(actions) -> list[str]:
    return [a.kind for a in actions if isinstance(a, Emit)]


def deliver(m: RolloutMachine, devices, now: float, version: int = 7) -> None:
    for d in devices:
        m.prepared(d, "sha256:old")
        m.assigned(d, version)
        m.observe(d, Observation(INSTALLED, version, now), now)


def test_spec_parsing() -> None:
    assert [s.text() for s in parse_steps("1,10%,50%,100%")] == ["1", "10%", "50%", "100%"]
    assert parse_duration("30s", what="x") == 30 and parse_duration("5m", what="x") == 300
    assert parse_duration("250ms", what="x") == 0.25
    assert spec(steps="1,10%,100%").cumulative(1000) == [1, 100, 1000]
    assert spec(steps="1,10%,100%").cumulative(5) == [1, 1, 5]
    assert spec(max_failures="10%").budget(25) == 2
    for bad in ("x", "-1", "150%"):
        with pytest.raises(RolloutSpecError):
            Amount.parse(bad, what="step")
    with pytest.raises(RolloutSpecError, match="end with 100%"):
        spec(steps="1,50%")
    with pytest.raises(RolloutSpecError, match="shorter than"):
        spec(healthy_for=60, step_timeout=30)
    with pytest.raises(RolloutSpecError, match="end with 100%"):
        spec(steps="1,2").cumulative(4)


def test_steps_in_order_behind_their_gates() -> None:
    m = RolloutMachine(spec(), ["d1", "d2", "d3", "d4"], now=0)
    acts = m.tick(0)
    assert assigns(acts) == [("d1",)] and kinds(acts) == ["rollout.step.started"]
    deliver(m, ["d1"], now=1)
    assert assigns(m.tick(2)) == []  # d1 is installed, not yet healthy for 3 s
    assert m.steps[1].started_at is None
    m = roundtrip(m)
    acts = m.tick(4.0)
    assert kinds(acts) == ["rollout.step.passed", "rollout.step.started"]
    assert assigns(acts) == [("d2",)]  # 50% of 4 = 2 in all: one more
    assert m.steps[0].finished_at == 4.0 and m.steps[1].started_at == 4.0
    deliver(m, ["d2"], now=5)
    acts = m.tick(8)
    assert assigns(acts) == [("d3", "d4")]
    deliver(m, ["d3", "d4"], now=9)
    assert m.counts(m.steps[2]) == {"installed": 2, "failed": 0, "pending": 0}
    acts = m.tick(12)
    assert kinds(acts)[-1] == "rollout.succeeded" and m.phase is Phase.SUCCEEDED


def test_failure_over_budget_rolls_back_what_was_assigned() -> None:
    m = RolloutMachine(spec(), ["d1", "d2", "d3", "d4"], now=0)
    m.tick(0)
    m.prepared("d1", "sha256:old")
    m.assigned("d1", 5)
    assert m.observe("d1", Observation(FAILED, 4, 1.0), 1.0) == []  # an older manifest's
    acts = m.observe("d1", Observation(FAILED, 5, 1.0, "exit-1: exited"), 1.0)
    assert kinds(acts) == ["rollout.device.failed", "rollout.over-budget", "rollout.rolling-back"]
    assert m.phase is Phase.ROLLING_BACK and m.steps[0].result == "failed"
    acts = m.tick(1.5)
    assert [a for a in acts if isinstance(a, Restore)] == [Restore((("d1", "sha256:old"),))]
    assert m.steps[1].started_at is None  # the next step never started
    acts = m.restored("d1", 2.0)
    assert kinds(acts) == ["rollout.rolled-back"] and m.phase is Phase.ROLLED_BACK


def test_without_auto_rollback_the_rollout_fails_and_abort_rolls_back_later() -> None:
    m = RolloutMachine(spec(auto_rollback=False), ["d1", "d2"], now=0)
    m.tick(0)
    m.prepared("d1", None)
    m.assigned("d1", 1)
    m.observe("d1", Observation(FAILED, 1, 1.0), 1.0)
    assert m.phase is Phase.FAILED
    assert [a for a in m.tick(2) if isinstance(a, Restore)] == []
    m.abort(3)
    assert m.tick(3) == [Restore((("d1", None),))]


def test_timeout_counts_offline_devices_against_the_budget() -> None:
    m = RolloutMachine(spec(steps="100%", max_failures="1"), ["d1", "d2", "d3"], now=0)
    assert assigns(m.tick(0)) == [("d1", "d2", "d3")]
    deliver(m, ["d1", "d2"], now=1)  # d3 is offline: no status ever
    m.tick(30)
    assert m.phase is Phase.RUNNING
    acts = m.tick(60)
    assert kinds(acts)[:2] == ["rollout.device.failed", "rollout.step.passed"]
    assert "no installed status within 60s" in m.devices["d3"].failed
    assert m.phase is Phase.SUCCEEDED  # one failure is within the budget
    m = RolloutMachine(spec(steps="100%", max_failures="0"), ["d1", "d2"], now=0)
    m.tick(0)
    deliver(m, ["d1"], now=1)
    m.tick(61)
    assert m.phase is Phase.ROLLING_BACK


def test_a_component_restart_or_leaving_installed_fails_the_device() -> None:
    m = RolloutMachine(spec(steps="100%", max_failures="2"), ["d1", "d2"], now=0)
    m.tick(0)
    deliver(m, ["d1", "d2"], now=1)
    m.observe("d1", Observation(INSTALLED, 7, 2.0), 2.0)  # a newer status, same manifest
    m.observe("d2", Observation(DeploymentState.INSTALLING, 7, 2.0), 2.0)
    assert m.devices["d1"].failed == "a component restarted"
    assert m.devices["d2"].failed == "left installed (installing)"
    m.tick(5)
    assert m.phase is Phase.SUCCEEDED


def test_pause_holds_the_clock_and_resume_continues() -> None:
    m = RolloutMachine(spec(), ["d1", "d2"], now=0)
    m.tick(0)
    m.prepared("d1", None)
    m.assigned("d1", 1)
    m.pause(10)
    with pytest.raises(RolloutStateError):
        m.pause(11)
    assert m.tick(100) == [] and m.phase is Phase.PAUSED
    m = roundtrip(m)
    m.resume(100)
    m.tick(120)  # 60 s timeout counted from 0 plus the 90 s paused: not yet
    assert m.devices["d1"].failed is None
    m.observe("d1", Observation(INSTALLED, 1, 121), 121)
    m.tick(125)
    # 50% of 2 adds nobody: that step passes at once and the last one starts
    assert m.steps[0].result == "passed" and m.steps[1].result == "passed" and m.current == 2


def test_abort_rolls_back_and_finished_rollouts_refuse_commands() -> None:
    m = RolloutMachine(spec(), ["d1", "d2"], now=0)
    m.tick(0)
    deliver(m, ["d1"], now=1)
    acts = m.abort(2)
    assert kinds(acts) == ["rollout.aborted", "rollout.rolling-back"]
    m.tick(2)
    m.restored("d1", 3)
    assert m.phase is Phase.ROLLED_BACK
    for command in (m.pause, m.resume, m.abort):
        with pytest.raises(RolloutStateError):
            command(4)


def test_joiners_get_the_current_phase() -> None:
    m = RolloutMachine(spec(steps="1,100%"), ["d1", "d2"], now=0)
    m.tick(0)
    acts = m.join(["d9", "d1"], now=1)
    assert kinds(acts) == ["rollout.joined"] and m.steps[0].devices == ["d1", "d9"]
    assert assigns(m.tick(1)) == [("d1", "d9")]
    deliver(m, ["d1", "d9"], now=1)
    acts = m.tick(5)
    assert assigns(acts) == [("d2",)]
