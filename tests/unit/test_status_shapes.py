"""One typed deployment status end to end: the wire message and Margo's stored document both
convert to and from ``DeploymentStatus`` without loss."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from margo_stream.protocol.status_wire import status_from_wire, status_to_wire
from margo_stream.state.status import (
    ComponentStatus,
    DeploymentState,
    DeploymentStatus,
    StatusError,
    status_from_margo,
    status_to_margo,
)

text = st.text(min_size=1, max_size=20)
errors = st.none() | st.builds(StatusError, code=text, source=text, message=text)
states = st.sampled_from(list(DeploymentState))
statuses = st.builds(
    DeploymentStatus,
    deployment_id=text,
    manifest_version=st.integers(0, 2**63),
    state=states,
    error=errors,
    components=st.lists(
        st.builds(ComponentStatus, name=text, state=states, error=errors), max_size=3
    ).map(tuple),
)


@given(statuses, st.integers(0, 2**63))
def test_wire_round_trip(status: DeploymentStatus, seq: int) -> None:
    message = status_to_wire(seq, status)
    assert message.seq == seq
    assert status_from_wire(message) == status


@given(statuses)
def test_margo_document_round_trip(status: DeploymentStatus) -> None:
    doc = status_to_margo("press-01", status)
    assert doc["deviceId"] == "press-01" and doc["status"]["state"] == status.state.value
    assert status_from_margo(doc) == status


def test_a_document_of_another_shape_is_named() -> None:
    with pytest.raises(ValueError, match="adoptedManifestVersion"):
        status_from_margo({"deploymentId": "d", "status": {"state": "installed"}})
    with pytest.raises(ValueError):
        status_from_margo(
            {"deploymentId": "d", "adoptedManifestVersion": 1, "status": {"state": "x"}}
        )
