"""What an operator asks of a rollout, parsed and checked: steps, failure budget, durations.

Steps are cumulative: ``1,10%,50%,100%`` means one device, then a tenth of the targets in
all, then half, then every one. A share is rounded up (10% of 5 devices is 1), a count above
the number of targets means all of them, and the last step must reach every target. The
failure budget ``N`` or ``N%`` applies to each step (a share of the step's devices) and to
the whole rollout (a share of all targets).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from margo_stream.errors import ConfigError

MAX_STEPS = 32
MAX_TARGETS = 100_000
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")


class RolloutSpecError(ConfigError):
    """A rollout request that cannot run as given; the message says what to change."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RolloutSpecError(
            f"invalid rollout name {name!r}: use 1-63 lowercase letters, digits, '-' or '.',"
            " starting and ending with a letter or digit"
        )
    return name


def parse_duration(text: str | float | int, *, what: str) -> float:
    """``30s``, ``5m``, ``1.5h``, ``250ms`` or plain seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _DURATION.match(str(text).strip())
        if not match:
            raise RolloutSpecError(
                f"invalid {what} {text!r}: expected a duration such as 30s, 5m or 1h"
            )
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(value) or value < 0:
        raise RolloutSpecError(f"invalid {what} {text!r}: must be a positive duration")
    return value


@dataclass(frozen=True, slots=True)
class Amount:
    """A count, or a share in percent of some total."""

    value: float
    percent: bool

    @classmethod
    def parse(cls, text: str | int, *, what: str) -> Amount:
        raw = str(text).strip()
        percent = raw.endswith("%")
        number = raw[:-1] if percent else raw
        try:
            value = float(number) if percent else int(number)
        except ValueError:
            raise RolloutSpecError(
                f"invalid {what} {text!r}: expected a count (3) or a share (10%)"
            ) from None
        if value < 0 or (percent and value > 100) or not math.isfinite(value):
            raise RolloutSpecError(f"invalid {what} {text!r}: out of range")
        return cls(float(value), percent)

    def of(self, total: int, *, round_up: bool) -> int:
        if not self.percent:
            return int(self.value)
        exact = self.value * total / 100
        # a share computed in binary floating point: 1e-9 keeps 10% of 30 at 3
        return math.ceil(exact - 1e-9) if round_up else math.floor(exact + 1e-9)

    def text(self) -> str:
        return f"{self.value:g}%" if self.percent else str(int(self.value))


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """What the operator asked for; stored with the rollout, never changed afterwards."""

    name: str
    deployment_id: str
    digest: str  # the operator-signed document this rollout assigns
    steps: tuple[Amount, ...]
    max_failures: Amount
    healthy_for: float
    step_timeout: float
    auto_rollback: bool
    devices: tuple[str, ...] = ()  # the target set: named devices ...
    selector: tuple[tuple[str, str], ...] = ()  # ... or operator labels (joiners welcome)
    # what a rollback may bring back: digest -> the operator's signature of it (canonical
    # JSON), signed after the new revision's so that a device holding the new revision takes
    # it (devices refuse an older signature as a replay); margoctl signs one for each version
    # of the deployment that devices of the tenant had when the rollout was created
    rollback: tuple[tuple[str, str], ...] = ()
    certificate: str | None = None  # digest of the operator's certificate (a stored blob)

    def __post_init__(self) -> None:
        check_name(self.name)
        if not self.steps or len(self.steps) > MAX_STEPS:
            raise RolloutSpecError(f"give 1 to {MAX_STEPS} steps, e.g. --steps 1,10%,100%")
        last = self.steps[-1]
        if not (last.percent and last.value >= 100):
            # a count as the last step reaches every target only if there are that few
            if last.percent:
                raise RolloutSpecError(
                    f"the last step ({last.text()}) must reach every target: end with 100%"
                )
        if self.healthy_for >= self.step_timeout:
            raise RolloutSpecError(
                f"--healthy-for ({self.healthy_for:g}s) must be shorter than --step-timeout"
                f" ({self.step_timeout:g}s): no device could pass the gate in time"
            )
        if bool(self.devices) == bool(self.selector):
            raise RolloutSpecError("give the targets as --device ID ... or as --selector k=v")

    def cumulative(self, total: int) -> list[int]:
        """How many targets have the revision once each step started (non-decreasing)."""
        out: list[int] = []
        for step in self.steps:
            n = min(total, max(step.of(total, round_up=True), out[-1] if out else 0))
            out.append(n)
        if out and out[-1] < total:
            raise RolloutSpecError(
                f"the last step ({self.steps[-1].text()}) reaches {out[-1]} of {total} targets:"
                " end with 100%"
            )
        return out

    def budget(self, total: int) -> int:
        """Failures allowed among ``total`` devices (a step's, or the whole rollout's)."""
        return self.max_failures.of(total, round_up=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "deploymentId": self.deployment_id,
            "digest": self.digest,
            "steps": [s.text() for s in self.steps],
            "maxFailures": self.max_failures.text(),
            "healthyFor": self.healthy_for,
            "stepTimeout": self.step_timeout,
            "autoRollback": self.auto_rollback,
            "devices": list(self.devices),
            "selector": dict(self.selector),
            "rollbackSignatures": dict(self.rollback),
            "certificate": self.certificate,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RolloutSpec:
        return cls(
            name=doc["name"],
            deployment_id=doc["deploymentId"],
            digest=doc["digest"],
            steps=tuple(Amount.parse(s, what="step") for s in doc["steps"]),
            max_failures=Amount.parse(doc["maxFailures"], what="max-failures"),
            healthy_for=float(doc["healthyFor"]),
            step_timeout=float(doc["stepTimeout"]),
            auto_rollback=bool(doc["autoRollback"]),
            devices=tuple(doc.get("devices") or ()),
            selector=tuple(sorted((doc.get("selector") or {}).items())),
            rollback=tuple(sorted((doc.get("rollbackSignatures") or {}).items())),
            certificate=doc.get("certificate"),
        )


def parse_steps(text: str | list[str]) -> tuple[Amount, ...]:
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    steps = tuple(Amount.parse(item, what="step") for item in items if str(item).strip())
    if not steps:
        raise RolloutSpecError("--steps is empty: give e.g. 1,10%,100%")
    return steps
