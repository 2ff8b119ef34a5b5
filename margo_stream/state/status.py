"""Deployment status in Margo's terms (deployment-status.md): one status per deployment with
per-component states, an optional error ``{code, source, message}`` and the manifest version
the device adopted. The overall state is the most severe component state."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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


# --- Margo's document shape (deployment-status.md): the one way a status is stored and shown ---


def status_to_margo(device_id: str, status: DeploymentStatus) -> dict[str, Any]:
    """``status`` as Margo's ``DeploymentStatus`` document (what the store keeps)."""
    inner: dict[str, Any] = {"state": status.state.value}
    if status.error is not None:
        inner["error"] = _error_doc(status.error)
    components = []
    for c in status.components:
        comp: dict[str, Any] = {"name": c.name, "state": c.state.value}
        if c.error is not None:
            comp["error"] = _error_doc(c.error)
        components.append(comp)
    return {
        "deploymentId": status.deployment_id,
        "deviceId": device_id,
        "adoptedManifestVersion": status.manifest_version,
        "status": inner,
        "components": components,
    }


def status_from_margo(doc: Mapping[str, Any]) -> DeploymentStatus:
    """A stored Margo ``DeploymentStatus`` document back as the typed status; ``ValueError``
    names what is wrong with a document of another shape."""
    try:
        inner = doc["status"]
        return DeploymentStatus(
            deployment_id=str(doc["deploymentId"]),
            manifest_version=int(doc["adoptedManifestVersion"]),
            state=DeploymentState(inner["state"]),
            error=_error_of(inner.get("error")),
            components=tuple(
                ComponentStatus(
                    name=str(c["name"]),
                    state=DeploymentState(c["state"]),
                    error=_error_of(c.get("error")),
                )
                for c in doc.get("components") or ()
            ),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a Margo deployment status document: missing or bad {exc}") from None


def _error_doc(error: StatusError) -> dict[str, str]:
    return {"code": error.code, "source": error.source, "message": error.message}


def _error_of(doc: Any) -> StatusError | None:
    if doc is None:
        return None
    return StatusError(
        code=str(doc["code"]), source=str(doc["source"]), message=str(doc["message"])
    )
