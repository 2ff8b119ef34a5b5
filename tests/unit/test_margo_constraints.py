"""rc.3 device capabilities and deployment constraints: validation naming the field, matching
against what devices report, the deterministic bundle, and Margo's problem types."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import yaml

from controller.device_api.margo_documents import validate_capabilities
from controller.problems import DEVICE_PROBLEMS, OPERATOR_PROBLEMS, Problem
from margo_stream.errors import DocumentError
from margo_stream.state.bundle import build_bundle, read_bundle
from margo_stream.state.capabilities import parse_quantity, runs
from margo_stream.state.constraints import unmet, validate_constraints
from margo_stream.state.documents import parse_deployment

MARGO = "https://docs.margo.org/specification/problem-types#"


def caps_doc(**props: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "edge-1",
        "vendor": "Acme",
        "modelNumber": "m1",
        "serialNumber": "s1",
        "cpus": [{"cores": 4, "architecture": "amd64"}],
        "memory": "8 Gi",
        "storage": "100Gi",
        "peripherals": [{"type": "gpu", "manufacturer": "NVIDIA"}],
        "interfaces": [{"type": "ethernet"}],
        "otelCollector": True,
        "supportedRuntimes": ["oci"],
        "supportedDeploymentTypes": ["compose"],
    }
    base.update(props)
    return {"properties": base, "labels": {"site": "north", "zones": ["a", "b"]}}


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({"cpus": [{"cores": 4, "architecture": "x86_64"}]}, "properties.cpus[0].architecture"),
        ({"cpus": [{"architecture": "amd64"}]}, "properties.cpus[0].cores"),
        ({"peripherals": [{"type": "keyboard"}]}, "properties.peripherals[0].type"),
        ({"otelCollector": "yes"}, "properties.otelCollector"),
        ({"memory": 4}, "properties.memory"),
        ({"memory": "4 GB"}, "properties.memory"),
        ({"supportedRuntimes": []}, "properties.supportedRuntimes"),
        ({"supportedRuntimes": ["docker"]}, "properties.supportedRuntimes[0]"),
        ({"supportedDeploymentTypes": ["helm.v3"]}, "properties.supportedDeploymentTypes[0]"),
        ({"interfaces": [{"type": "loopback"}]}, "properties.interfaces[0].type"),
        ({"id": "other"}, "properties.id"),
    ],
)
def test_capabilities_breaking_rc3_are_422_naming_the_field(
    props: dict[str, Any], field: str
) -> None:
    with pytest.raises(Problem) as exc:
        validate_capabilities(caps_doc(**props), "edge-1", "edge-1")
    assert exc.value.status == 422 and exc.value.kind == "semantic-error"
    assert exc.value.errors and exc.value.errors[0]["field"] == field
    doc = exc.value.document(DEVICE_PROBLEMS, "/api/v1/capabilities/edge-1")
    assert doc["type"] == MARGO + "semantic-error" and doc["title"] == "Semantic Error"


def test_capabilities_accepted_and_who_may_report() -> None:
    caps, labels = validate_capabilities(caps_doc(), "edge-1", "edge-1")
    assert caps["memory"] == "8 Gi" and labels == {"site": "north", "zones": "a,b"}
    # a see-thru gateway reports the devices behind it, and only those
    child = caps_doc(id="edge-1/cam-2")
    assert validate_capabilities(child, "edge-1/cam-2", "edge-1")[0]["id"] == "edge-1/cam-2"
    for path in ("edge-2", "edge-10/x", "edge-2/edge-1"):
        with pytest.raises(Problem) as exc:
            validate_capabilities(caps_doc(id=path), path, "edge-1")
        assert exc.value.status == 403 and exc.value.kind == "not-authorized"
    with pytest.raises(Problem) as exc:
        validate_capabilities([1], "edge-1", "edge-1")
    assert exc.value.status == 400 and exc.value.kind == "invalid-request"


def test_problem_namespaces() -> None:
    ours = Problem(409, "x", kind="status-refused").document(DEVICE_PROBLEMS)
    assert ours["type"] == "https://margo-stream.dev/problems#status-refused"
    blank = Problem(404, "no route", kind="not-found").document(DEVICE_PROBLEMS)
    assert blank["type"] == "about:blank" and blank["title"] == "Not Found"
    for kind, status in (("not-authorized", 403), ("server-cannot-generate-response", 406)):
        doc = Problem(status, "x", kind=kind).document(DEVICE_PROBLEMS)
        assert doc["type"] == MARGO + kind
    operator = Problem(403, "x", kind="not-authorized").document(OPERATOR_PROBLEMS)
    assert operator["type"] == "urn:margo-stream:problem:not-authorized"


PROCESS_DOC = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {applicationId: demo, id: demo-1}
  name: demo
  namespace: ns
spec:
  deploymentProfile:
    type: process
    components:
      - name: main
        properties: {command: [sleep, "60"]}
"""


def with_constraints(constraints: Any) -> bytes:
    doc = yaml.safe_load(PROCESS_DOC)
    doc["spec"]["deploymentProfile"]["deviceConstraints"] = constraints
    return yaml.safe_dump(doc).encode()


@pytest.mark.parametrize(
    ("constraints", "where"),
    [
        ({"capacityRequirements": {"memory": "1 GB"}}, "capacityRequirements.memory"),
        ({"capacityRequirements": {"memory": "1Ti"}}, "capacityRequirements.memory"),
        ({"capacityRequirements": {"storage": "1.5Gi"}}, "capacityRequirements.storage"),
        ({"capacityRequirements": {"cpu": {"architectures": ["amd64"]}}}, "cpu.cores"),
        (
            {"capacityRequirements": {"cpu": {"cores": 1, "architectures": ["x86"]}}},
            "architectures[0]",
        ),
        (
            {
                "eligibilityRules": [
                    {"labelSelector": {"matchExpressions": [{"key": "a", "operator": "Equals"}]}}
                ]
            },
            "eligibilityRules[0].labelSelector.matchExpressions[0].operator",
        ),
        (
            {
                "eligibilityRules": [
                    {
                        "propertySelector": {
                            "matchExpressions": [{"key": "memory", "operator": "Exists"}]
                        }
                    }
                ]
            },
            "matchExpressions[0].key",
        ),
        (
            {
                "eligibilityRules": [
                    {"labelSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}
                ]
            },
            "matchExpressions[0].values",
        ),
        (
            {
                "eligibilityRules": [
                    {
                        "propertySelector": {
                            "matchExpressions": [{"key": "/peripherals", "operator": "ContainsAny"}]
                        }
                    }
                ]
            },
            "matchExpressions[0].itemSelector",
        ),
        ({"capacityRequirement": {}}, "deviceConstraints.capacityRequirement"),
    ],
)
def test_device_constraints_are_validated_naming_the_field(constraints: Any, where: str) -> None:
    with pytest.raises(DocumentError) as exc:
        parse_deployment(with_constraints(constraints), source="doc")
    assert "spec.deploymentProfile.deviceConstraints" in str(exc.value)
    assert where in str(exc.value), str(exc.value)


def test_matching_against_reported_capabilities() -> None:
    caps, labels = validate_capabilities(caps_doc(), "edge-1", "edge-1")
    ok = validate_constraints(
        {
            "capacityRequirements": {
                "cpu": {"cores": 2.5, "architectures": ["arm64", "amd64"]},
                "memory": "4096Mi",
                "storage": "100Gi",
            },
            "eligibilityRules": [
                {
                    "propertySelector": {
                        "matchExpressions": [
                            {"key": "/otelCollector", "operator": "In", "values": [True]},
                            {"key": "/memory", "operator": "Gt", "values": ["2Gi"]},
                            {"key": "/cpus/0/cores", "operator": "Lt", "values": [8]},
                            {
                                "key": "/peripherals",
                                "operator": "ContainsAny",
                                "itemSelector": {
                                    "matchExpressions": [
                                        {"key": "/type", "operator": "In", "values": ["gpu"]}
                                    ]
                                },
                            },
                            {"key": "/serialNumber", "operator": "NotIn", "values": ["bad"]},
                            {"key": "/nothing", "operator": "DoesNotExist"},
                        ]
                    },
                    "labelSelector": {
                        "matchExpressions": [
                            {"key": "site", "operator": "In", "values": ["north", "south"]},
                            {
                                "key": "zones",
                                "operator": "ContainsAll",
                                "itemSelector": {
                                    "matchExpressions": [
                                        {"key": "", "operator": "In", "values": ["a"]},
                                        {"key": "", "operator": "In", "values": ["b"]},
                                    ]
                                },
                            },
                        ]
                    },
                }
            ],
        }
    )
    assert unmet(ok, "process", caps, labels) is None
    cases = {
        "capacityRequirements.memory: needs 16Gi, the device reports 8 Gi": {
            "capacityRequirements": {"memory": "16Gi"}
        },
        "capacityRequirements.cpu.cores: needs 8 cores": {
            "capacityRequirements": {"cpu": {"cores": 8}}
        },
        "capacityRequirements.cpu.architectures: needs one of arm64": {
            "capacityRequirements": {"cpu": {"cores": 1, "architectures": ["arm64"]}}
        },
        "eligibilityRules[0].labelSelector.matchExpressions[0]: 'site' In ['south']": {
            "eligibilityRules": [
                {
                    "labelSelector": {
                        "matchExpressions": [{"key": "site", "operator": "In", "values": ["south"]}]
                    }
                }
            ]
        },
    }
    for reason, constraints in cases.items():
        got = unmet(validate_constraints(constraints), "process", caps, labels)
        assert got is not None and got.startswith("deviceConstraints.")
        assert reason in got, got


def test_an_agent_report_and_the_wasm_runtime() -> None:
    """Our agents report kernel names (x86_64) and runtimes by name; rc.3 devices may say
    ``custom`` plus an extension object naming the runtime."""
    agent = {
        "id": "edge-1",
        "cpus": [{"cores": 2, "architecture": "x86_64"}],
        "memory": "3 Gi",
        "supportedRuntimes": ["process", "wasm"],
    }
    need_amd64 = validate_constraints(
        {"capacityRequirements": {"cpu": {"cores": 2, "architectures": ["amd64"]}, "memory": "3Gi"}}
    )
    assert unmet(need_amd64, "wasm", agent, {}) is None
    no_wasm = {**agent, "supportedRuntimes": ["process"]}
    reason = unmet(None, "wasm", no_wasm, {})
    assert reason is not None and reason.startswith("deploymentProfile.type: wasm needs")
    rc3_device = {
        "supportedRuntimes": ["custom"],
        "x-acme-extensions": {"runtimes": ["wasm"]},
    }
    assert runs(rc3_device, "wasm") and not runs({"supportedRuntimes": ["oci"]}, "wasm")
    assert unmet(None, "process", no_wasm, {}) is None
    assert parse_quantity("59 Gi") == 59 << 30 and parse_quantity("4 GB") is None


def test_the_bundle_is_deterministic() -> None:
    docs = [("b-2", b"kind: B\n"), ("a-1", b"kind: A\n")]
    one, two = build_bundle(docs), build_bundle(list(reversed(docs)))
    assert one == two and one[:2] == b"\x1f\x8b"
    assert hashlib.sha256(one).hexdigest() == hashlib.sha256(build_bundle(docs)).hexdigest()
    assert read_bundle(one) == {"a-1.yaml": b"kind: A\n", "b-2.yaml": b"kind: B\n"}
    with pytest.raises(ValueError):
        build_bundle([])
