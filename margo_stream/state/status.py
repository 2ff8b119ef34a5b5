"""Deployment status in Margo's terms (deployment-status.md): one status per deployment with
per-component states, an optional error ``{code, source, message}`` and the manifest version
the device adopted. The overall state is the most severe component state."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DeploymentState(enum.StrEnum):
    PENDING = "pending"
    INSTALLING = "installing"
    INSTALLED = "installed"
    FAILED = "failed"
    REMOVING = "removing"
    REMOVED = "removed"


# Most severe first: a deployment is only as far along as its least-finished component.
SEVERITY: tuple[DeploymentState, ...] = (
    DeploymentState.FAILED,
    DeploymentState.REMOVING,
    DeploymentState.INSTALLING,
    DeploymentState.PENDING,
    DeploymentState.INSTALLED,
    DeploymentState.REMOVED,
)


@dataclass(frozen=True, slots=True)
class StatusError:
    code: str
    source: str
    message: str


@dataclass(frozen=True, slots=True)
class ComponentStatus:
    name: str
    state: DeploymentState
    error: StatusError | None = None


@dataclass(frozen=True, slots=True)
class DeploymentStatus:
    deployment_id: str
    manifest_version: int
    state: DeploymentState
    components: tuple[ComponentStatus, ...] = ()
    error: StatusError | None = None


def overall_state(
    components: tuple[ComponentStatus, ...] | list[ComponentStatus],
) -> DeploymentState:
    """The most severe state among ``components`` (``pending`` when there are none)."""
    if not components:
        return DeploymentState.PENDING
    return min((c.state for c in components), key=SEVERITY.index)
