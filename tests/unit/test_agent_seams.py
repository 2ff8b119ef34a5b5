"""The agent's typed seams: the setup features plug into, specs checked once, status on the wire."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest

from agent.desired import Overlay
from agent.desired_specs import CheckedSpecs, check_specs, read_specs
from agent.ports import AgentHost, AgentSetup
from margo_stream.errors import DocumentError
from margo_stream.identity.trust import DeviceCredentials
from margo_stream.protocol import messages as m
from margo_stream.protocol.status_wire import status_to_wire
from margo_stream.state.manifest import Manifest, ManifestEntry
from margo_stream.state.spec import ComponentSpec, DeploymentSpec, ProfileType
from margo_stream.state.status import (
    ComponentStatus,
    DeploymentState,
    DeploymentStatus,
    StatusError,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def setup(tmp_path: Path) -> AgentSetup:
    from agent.config import AgentConfig
    from agent.controller_list import parse_controllers

    config = AgentConfig(
        identity=tmp_path / "id",
        controllers=parse_controllers("127.0.0.1:1"),
        state=tmp_path,
    )
    creds = DeviceCredentials(
        cert_path=tmp_path / "c",
        key_path=tmp_path / "k",
        ca_path=tmp_path / "ca",
        signing_pub_path=tmp_path / "s",
        root_pub_path=tmp_path / "r",
        tenant="acme",
        device_id="press-01",
        spiffe_id="spiffe://acme/margo/client/press-01",
    )
    return AgentSetup(config, creds)


def test_the_setup_is_an_agent_host(tmp_path: Path) -> None:
    s = setup(tmp_path)
    host: AgentHost = s  # checked by mypy too
    assert host.device_id == "press-01" and host.tenant == "acme"
    assert host.stream_handlers == {} and host.session_tasks == []
    assert not hasattr(s, "features")
    with pytest.raises(AttributeError):
        s.features = {}  # type: ignore[attr-defined]


def doc(deployment_id: str) -> bytes:
    return f"""
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata: {{annotations: {{applicationId: app, id: {deployment_id}}}, name: app, namespace: n}}
spec:
  deploymentProfile:
    type: compose
    components: [{{name: web, properties: {{packageLocation: p}}}}]
""".encode()


def manifest(*entries: tuple[str, bytes]) -> tuple[Manifest, dict[str, bytes]]:
    blobs = {"sha256:" + hashlib.sha256(data).hexdigest(): data for _, data in entries}
    digests = list(blobs)
    m_ = Manifest(
        manifest_version=3,
        tenant="acme",
        device_id="press-01",
        issued_at=NOW,
        expires=NOW + dt.timedelta(days=1),
        deployments=tuple(
            ManifestEntry(deployment_id=dep_id, digest=d)
            for (dep_id, _), d in zip(entries, digests, strict=True)
        ),
    )
    return m_, blobs


def test_read_specs_parses_each_document_into_checked_specs() -> None:
    man, blobs = manifest(("dep-a", doc("dep-a")), ("dep-b", doc("dep-b")))
    checked = read_specs(man, blobs)
    assert isinstance(checked, CheckedSpecs)
    assert [s.deployment_id for s in checked] == ["dep-a", "dep-b"] and len(checked) == 2
    assert checked.specs[0].digest == man.deployments[0].digest


def test_read_specs_refuses_a_document_with_another_id() -> None:
    man, blobs = manifest(("dep-a", doc("dep-b")))
    with pytest.raises(DocumentError, match="whose id is 'dep-b'"):
        read_specs(man, blobs)


def test_check_specs_refuses_unsafe_names() -> None:
    bad = DeploymentSpec("../x", "sha256:" + "0" * 64, "x", ProfileType.PROCESS, (), ())
    with pytest.raises(DocumentError):
        check_specs([bad])
    good = DeploymentSpec(
        "ok",
        "sha256:" + "0" * 64,
        "ok",
        ProfileType.PROCESS,
        (ComponentSpec("ok", "c", ProfileType.PROCESS, ("true",)),),
    )
    assert check_specs([good]).specs == (good,)


def test_overlay_prefers_the_push() -> None:
    view = Overlay({"a": b"new"}, {"a": b"old", "b": b"held"})
    assert view["a"] == b"new" and view["b"] == b"held"
    assert "b" in view and "c" not in view
    assert sorted(view) == ["a", "b"] and len(view) == 2
    with pytest.raises(KeyError):
        view["c"]


def test_status_to_wire() -> None:
    err = StatusError("boom", "agent", "it broke")
    status = DeploymentStatus(
        "dep-a",
        4,
        DeploymentState.FAILED,
        (
            ComponentStatus("web", DeploymentState.FAILED, err),
            ComponentStatus("db", DeploymentState.INSTALLED),
        ),
        err,
    )
    wire = status_to_wire(7, status)
    assert wire == m.Status(
        seq=7,
        deployment_id="dep-a",
        manifest_version=4,
        state="failed",
        error=m.StatusErrorModel(code="boom", source="agent", message="it broke"),
        components=[
            m.ComponentStatusModel(
                name="web",
                state="failed",
                error=m.StatusErrorModel(code="boom", source="agent", message="it broke"),
            ),
            m.ComponentStatusModel(name="db", state="installed"),
        ],
    )
