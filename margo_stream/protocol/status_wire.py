"""Deployment status on the wire: the typed ``DeploymentStatus`` to and from the ``status``
message, so both ends work with the one typed status and only this module knows the wire
fields."""

from __future__ import annotations

from margo_stream.protocol import messages as m
from margo_stream.state.status import (
    ComponentStatus,
    DeploymentState,
    DeploymentStatus,
    StatusError,
)


def status_to_wire(seq: int, status: DeploymentStatus) -> m.Status:
    return m.Status(
        seq=seq,
        deployment_id=status.deployment_id,
        manifest_version=status.manifest_version,
        state=status.state.value,
        error=_error_to_wire(status.error),
        components=[
            m.ComponentStatusModel(name=c.name, state=c.state.value, error=_error_to_wire(c.error))
            for c in status.components
        ],
    )


def status_from_wire(message: m.Status) -> DeploymentStatus:
    """The typed status of a validated ``status`` message (pydantic checked every field)."""
    return DeploymentStatus(
        deployment_id=message.deployment_id,
        manifest_version=message.manifest_version,
        state=DeploymentState(message.state),
        error=_error_from_wire(message.error),
        components=tuple(
            ComponentStatus(
                name=c.name, state=DeploymentState(c.state), error=_error_from_wire(c.error)
            )
            for c in message.components
        ),
    )


def _error_to_wire(error: StatusError | None) -> m.StatusErrorModel | None:
    if error is None:
        return None
    return m.StatusErrorModel(code=error.code, source=error.source, message=error.message)


def _error_from_wire(error: m.StatusErrorModel | None) -> StatusError | None:
    if error is None:
        return None
    return StatusError(code=error.code, source=error.source, message=error.message)
