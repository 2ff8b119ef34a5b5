"""The rollout state machine, sans-IO: observations and the time in, actions out.

Theory of operation
-------------------
A rollout assigns one operator-signed document (``RolloutSpec.digest``) to its targets in
cumulative steps. The machine never touches the store or the network: the driver
(``controller.rollouts.driver``) feeds it what devices reported (``observe``), the time
(``tick``) and operator commands (``pause``/``resume``/``abort``), performs the actions
``tick`` returns, and reports back what it did (``prepared``, ``assigned``, ``restored``).
Everything it knows is in ``to_json``, stored after every change, so a restarted controller
(or another instance of the cluster) carries on where this one stopped.

Phases (``Phase``)::

    running --pause--> paused --resume--> running
    running --last step passed its gate--> succeeded
    running --over budget, auto-rollback--> rolling-back --every device restored--> rolled-back
    running --over budget, no auto-rollback--> failed
    running | paused | failed --abort--> rolling-back

A step starts (``Assign`` of its devices) only after the previous one passed its gate. A
device of a step is, in order: *prepared* (its previous assignment of the deployment is
recorded, so a rollback can restore it), *assigned* (the store points it at the new document;
``version`` is the manifest version that carries it), *installed* (a status at or above that
version says ``installed``), *healthy* (installed for ``healthy_for`` without a change). It
*fails* on a ``failed`` status, on leaving ``installed`` or a component restart (a newer status
of the same manifest version) before it is healthy, or when ``step_timeout`` passes without an
installed status (an offline device included). A step passes when each of its devices is
healthy or failed; failures above the budget (per step, or overall) stop the rollout at once.

A device joining the target set (a ``--selector`` rollout) while the rollout runs or is paused
joins the current step: it gets the revision of the phase the rollout is in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from controller.rollouts.spec import RolloutSpec
from margo_stream.state.status import DeploymentState


class Phase(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    ROLLING_BACK = "rolling-back"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"


ACTIVE = frozenset({Phase.RUNNING, Phase.PAUSED, Phase.ROLLING_BACK})


class RolloutStateError(ValueError):
    """A command the rollout's phase does not allow (pause a finished rollout, ...)."""


@dataclass(frozen=True, slots=True)
class Observation:
    """The newest status a device reported of the rollout's deployment."""

    state: DeploymentState
    version: int  # adoptedManifestVersion
    updated_at: float  # when the store took it
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Assign:
    """Point these devices at the rollout's document and push (record each device's previous
    assignment first: ``prepared``; then ``assigned`` with the manifest version)."""

    devices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Restore:
    """Give these devices their previous desired state back: ``(device, digest or None)``,
    None meaning the deployment was not assigned before (unassign it); then ``restored``."""

    devices: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True, slots=True)
class Emit:
    """An event for the tenant's feed."""

    kind: str
    device: str | None
    payload: dict[str, Any]


Action = Assign | Restore | Emit


@dataclass(slots=True)
class DeviceTrack:
    step: int
    since: float  # when its step started (or it joined): the step timeout counts from here
    prepared: bool = False
    previous: str | None = None
    version: int | None = None
    reached: float | None = None
    seen: float | None = None
    seen_version: int | None = None
    healthy: bool = False
    failed: str | None = None
    restored: bool = False

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class StepState:
    devices: list[str] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    result: str | None = None  # passed | failed


class RolloutMachine:
    def __init__(self, spec: RolloutSpec, targets: list[str], now: float) -> None:
        self.spec = spec
        self.phase = Phase.RUNNING
        self.targets: list[str] = list(dict.fromkeys(targets))
        self.steps = [StepState() for _ in spec.steps]
        self.current = -1  # index of the step under way
        self.devices: dict[str, DeviceTrack] = {}
        self.created = now
        self.finished_at: float | None = None
        self.paused_at: float | None = None
        self.reason: str | None = None
        spec.cumulative(len(self.targets))  # RolloutSpecError now, not at the last step

    # --- operator commands -------------------------------------------------------------------
    def pause(self, now: float) -> list[Action]:
        if self.phase is not Phase.RUNNING:
            raise RolloutStateError(f"rollout {self.spec.name} is {self.phase}, not running")
        self.phase, self.paused_at = Phase.PAUSED, now
        return [Emit("rollout.paused", None, self._summary())]

    def resume(self, now: float) -> list[Action]:
        if self.phase is not Phase.PAUSED:
            raise RolloutStateError(f"rollout {self.spec.name} is {self.phase}, not paused")
        held = now - (self.paused_at or now)
        for track in self.devices.values():  # the time paused does not count against them
            if track.step == self.current and not track.healthy and track.failed is None:
                track.since += held
        self.phase, self.paused_at = Phase.RUNNING, None
        return [Emit("rollout.resumed", None, self._summary())]

    def abort(self, now: float) -> list[Action]:
        if self.phase not in (Phase.RUNNING, Phase.PAUSED, Phase.FAILED):
            raise RolloutStateError(
                f"rollout {self.spec.name} is {self.phase}: only a running, paused or failed"
                " rollout can be aborted"
            )
        self._stop_step(now)
        return [Emit("rollout.aborted", None, self._summary()), *self._roll_back(now, "aborted")]

    # --- what devices and the driver report --------------------------------------------------
    def join(self, device_ids: list[str], now: float) -> list[Action]:
        """Devices that entered the target set: they join the current step."""
        new = [d for d in device_ids if d not in self.devices and d not in self.targets]
        if not new or self.phase not in (Phase.RUNNING, Phase.PAUSED):
            return []
        self.targets.extend(new)
        if self.current < 0:
            return []  # the first step will count them
        step = self.steps[self.current]
        step.devices.extend(new)
        for d in new:
            self.devices[d] = DeviceTrack(step=self.current, since=now)
        return [Emit("rollout.joined", d, {"step": self.current + 1}) for d in new]

    def prepared(self, device_id: str, previous: str | None) -> None:
        track = self.devices[device_id]
        if not track.prepared:
            track.prepared, track.previous = True, previous

    def assigned(self, device_id: str, version: int) -> None:
        self.devices[device_id].version = version

    def restored(self, device_id: str, now: float) -> list[Action]:
        track = self.devices[device_id]
        track.restored = True
        if self.phase is Phase.ROLLING_BACK and not self._restore_due():
            self.phase, self.finished_at = Phase.ROLLED_BACK, now
            return [Emit("rollout.rolled-back", None, self._summary())]
        return []

    def observe(self, device_id: str, obs: Observation | None, now: float) -> list[Action]:
        track = self.devices.get(device_id)
        if (
            track is None
            or self.phase is not Phase.RUNNING
            or track.step != self.current
            or track.version is None
            or track.failed is not None
            or track.healthy
            or obs is None
            or obs.version < track.version
        ):
            return []
        if obs.state is DeploymentState.FAILED:
            return self._fail(device_id, f"failed: {obs.error or 'no reason given'}", now)
        if obs.state is DeploymentState.INSTALLED:
            if track.reached is None:
                track.reached = obs.updated_at
            elif track.seen is not None and obs.updated_at > track.seen:
                if obs.version == track.seen_version:
                    return self._fail(device_id, "a component restarted", now)
                track.reached = obs.updated_at  # a newer manifest: the window starts again
            track.seen, track.seen_version = obs.updated_at, obs.version
            return []
        if track.reached is not None:
            return self._fail(device_id, f"left installed ({obs.state})", now)
        return []

    # --- the time ---------------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        """Timeouts, gates, budget, the next step; what the driver must do now."""
        actions: list[Action] = []
        while self.phase is Phase.RUNNING:
            if self.current < 0 or self.steps[self.current].result == "passed":
                if self.current + 1 == len(self.steps):
                    self.phase, self.finished_at = Phase.SUCCEEDED, now
                    actions.append(Emit("rollout.succeeded", None, self._summary()))
                    break
                actions += self._start_step(self.current + 1, now)
                continue
            actions += self._evaluate(now)
            if self.steps[self.current].result != "passed":
                break
        if self.phase is Phase.RUNNING:
            due = tuple(
                d
                for d in self.steps[self.current].devices
                if self.devices[d].version is None and self.devices[d].failed is None
            )
            if due:
                actions.append(Assign(due))
        elif self.phase is Phase.ROLLING_BACK:
            due_back = self._restore_due()
            if due_back:
                actions.append(Restore(due_back))
            else:  # nothing had reached a device yet
                self.phase, self.finished_at = Phase.ROLLED_BACK, now
                actions.append(Emit("rollout.rolled-back", None, self._summary()))
        return actions

    # --- inside -------------------------------------------------------------------------------
    def _start_step(self, index: int, now: float) -> list[Action]:
        cumulative = self.spec.cumulative(len(self.targets))
        placed = {d for s in self.steps for d in s.devices}
        waiting = [d for d in self.targets if d not in placed]
        take = max(0, cumulative[index] - len(placed))
        step = self.steps[index]
        step.devices = waiting[:take]
        step.started_at = now
        self.current = index
        for d in step.devices:
            self.devices[d] = DeviceTrack(step=index, since=now)
        return [
            Emit(
                "rollout.step.started",
                None,
                {"rollout": self.spec.name, "step": index + 1, "devices": list(step.devices)},
            )
        ]

    def _evaluate(self, now: float) -> list[Action]:
        step = self.steps[self.current]
        actions: list[Action] = []
        done = True
        for d in step.devices:
            track = self.devices[d]
            if track.failed is not None or track.healthy:
                continue
            if track.reached is not None and now - track.reached >= self.spec.healthy_for:
                track.healthy = True
                continue
            if track.reached is None and now >= track.since + self.spec.step_timeout:
                actions += self._fail(
                    d, f"no installed status within {self.spec.step_timeout:g}s", now
                )
                if self.phase is not Phase.RUNNING:
                    return actions
                continue
            done = False
        if done:
            step.result, step.finished_at = "passed", now
            actions.append(
                Emit(
                    "rollout.step.passed",
                    None,
                    {"rollout": self.spec.name, "step": self.current + 1, **self.counts(step)},
                )
            )
        return actions

    def _fail(self, device_id: str, reason: str, now: float) -> list[Action]:
        self.devices[device_id].failed = reason
        actions: list[Action] = [
            Emit("rollout.device.failed", device_id, {"rollout": self.spec.name, "reason": reason})
        ]
        step = self.steps[self.current]
        in_step = sum(1 for d in step.devices if self.devices[d].failed is not None)
        overall = sum(1 for t in self.devices.values() if t.failed is not None)
        if in_step <= self.spec.budget(len(step.devices)) and overall <= self.spec.budget(
            len(self.targets)
        ):
            return actions
        self._stop_step(now)
        why = (
            f"{overall} device(s) failed, over the budget of"
            f" {self.spec.max_failures.text()} (step {self.current + 1}: {in_step} failed)"
        )
        actions.append(
            Emit("rollout.over-budget", None, {"rollout": self.spec.name, "reason": why})
        )
        if self.spec.auto_rollback:
            return actions + self._roll_back(now, why)
        self.phase, self.finished_at, self.reason = Phase.FAILED, now, why
        actions.append(Emit("rollout.failed", None, self._summary()))
        return actions

    def _stop_step(self, now: float) -> None:
        if self.current >= 0:
            step = self.steps[self.current]
            if step.result is None:
                step.result, step.finished_at = "failed", now

    def _roll_back(self, now: float, reason: str) -> list[Action]:
        self.phase, self.reason, self.paused_at = Phase.ROLLING_BACK, reason, None
        self.finished_at = None
        return [Emit("rollout.rolling-back", None, self._summary())]

    def _restore_due(self) -> tuple[tuple[str, str | None], ...]:
        return tuple(
            (d, t.previous) for d, t in self.devices.items() if t.prepared and not t.restored
        )

    def counts(self, step: StepState) -> dict[str, int]:
        tracks = [self.devices[d] for d in step.devices]
        failed = sum(1 for t in tracks if t.failed is not None)
        installed = sum(1 for t in tracks if t.failed is None and t.reached is not None)
        return {
            "installed": installed,
            "failed": failed,
            "pending": len(tracks) - failed - installed,
        }

    def _summary(self) -> dict[str, Any]:
        return {"rollout": self.spec.name, "state": str(self.phase), "reason": self.reason}

    # --- persistence ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "phase": str(self.phase),
            "targets": self.targets,
            "current": self.current,
            "steps": [
                {
                    "devices": s.devices,
                    "started_at": s.started_at,
                    "finished_at": s.finished_at,
                    "result": s.result,
                }
                for s in self.steps
            ],
            "devices": {d: t.to_json() for d, t in self.devices.items()},
            "created": self.created,
            "finished_at": self.finished_at,
            "paused_at": self.paused_at,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, spec: RolloutSpec, doc: dict[str, Any]) -> RolloutMachine:
        machine = cls.__new__(cls)
        machine.spec = spec
        machine.phase = Phase(doc["phase"])
        machine.targets = list(doc["targets"])
        machine.current = int(doc["current"])
        machine.steps = [StepState(**s) for s in doc["steps"]]
        machine.devices = {d: DeviceTrack(**t) for d, t in doc["devices"].items()}
        machine.created = float(doc["created"])
        machine.finished_at = doc.get("finished_at")
        machine.paused_at = doc.get("paused_at")
        machine.reason = doc.get("reason")
        return machine
