"""Margo's own example documents (copied into tests/margo_rc3/ with their source and hash)
through our parser and validators, and the rc.3 OpenAPI's schemas on the documents we accept.

Where an example contradicts rc.3 (workload-management-api-1.0.0-rc.3.yaml), rc.3 wins and
the test says so next to the example.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from controller.device_api.margo_documents import validate_capabilities, validate_status
from controller.problems import Problem
from margo_stream.errors import DocumentError
from margo_stream.state.documents import DocumentForm, parse_deployment

RC3 = Path(__file__).resolve().parents[1] / "margo_rc3"
EXAMPLES = RC3 / "examples"
SPEC = yaml.safe_load((RC3 / "workload-management-api-1.0.0-rc.3.yaml").read_text())


def rc3_schema(name: str) -> dict[str, Any]:
    """A JSON Schema (2020-12) for one of rc.3's component schemas."""
    return {"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]}


def rc3_errors(name: str, doc: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(rc3_schema(name))
    return [e.message for e in validator.iter_errors(doc)]


def test_the_copies_match_their_recorded_hashes() -> None:
    lines = [ln for ln in (RC3 / "SOURCE").read_text().splitlines() if ln and ln[0] != "#"]
    assert len(lines) == 17
    for line in lines:
        local, upstream, commit, digest = line.split()
        assert len(commit) == 40 and upstream
        data = (RC3 / local).read_bytes()
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest(), local


# ----------------------------------------------------------------- ApplicationDeployment

VALID = {
    # published form, id in metadata.annotations, profile type helm.v3 (read as helm, noted)
    "ApplicationDeployment-001.yaml": ("a3e2f5dc-912e-494f-8395-52cf3769bc06", "helm.v3"),
    # id at the top level, as rc.3 carries it
    "ApplicationDeployment-helm.yaml": ("a3e2f5dc-912e-494f-8395-52cf3769bc06", "helm.v3"),
    "ApplicationDeployment-compose.yaml": ("ad9b614e-8912-45f4-a523-372358765def", "compose"),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_examples_parse(name: str) -> None:
    dep = parse_deployment((EXAMPLES / "valid" / name).read_bytes(), source=name)
    assert (dep.deployment_id, str(dep.profile)) == VALID[name]
    assert dep.form is DocumentForm.PUBLISHED
    if name == "ApplicationDeployment-001.yaml":
        assert dep.notes == ("spec.deploymentProfile.type: 'helm.v3' read as rc.3's 'helm'",)
    else:
        assert dep.notes == ()


INVALID = {
    "ApplicationDeployment-001.yaml": "kind: kind must be 'ApplicationDeployment'",
    "ApplicationDeployment-002.yaml": "metadata.annotations.applicationId: applicationId",
    "ApplicationDeployment-003.yaml": "metadata.annotations.applicationId: applicationId",
    "model-ApplicationDeployment-003.yaml": "metadata.annotations.applicationId: applicationId",
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_examples_are_refused_naming_the_field(name: str) -> None:
    with pytest.raises(DocumentError, match=INVALID[name]):
        parse_deployment((EXAMPLES / "invalid" / name).read_bytes(), source=name)


def test_invalid_example_004_is_valid_under_rc3() -> None:
    """The example calls 'this-is-definitively-not-a-uuid' an invalid id because it is not a
    UUID; rc.3's appDeploymentManifest gives ``id: {type: string}`` with no format, so we
    follow rc.3 and accept it (our own rule: the id names files)."""
    name = "ApplicationDeployment-004.yaml"
    dep = parse_deployment((EXAMPLES / "invalid" / name).read_bytes(), source=name)
    assert dep.deployment_id == "this-is-definitively-not-a-uuid"


def rc3_form(published: bytes) -> dict[str, Any]:
    """The helm example rewritten in rc.3's form (appDeploymentManifest: no apiVersion/kind,
    the id at the top level, metadata.deviceId, spec.applicationId, helm components with
    oci:// repositories and SemVer revisions; parameters as they are)."""
    doc = yaml.safe_load(published)
    del doc["apiVersion"], doc["kind"]
    doc["metadata"]["deviceId"] = "edge-1"
    doc["spec"]["applicationId"] = doc["metadata"]["annotations"]["applicationId"]
    for comp in doc["spec"]["deploymentProfile"]["components"]:
        comp["properties"]["revision"] = str(comp["properties"]["revision"])
    return doc


def test_the_rc3_form_parses_and_passes_rc3_schema() -> None:
    doc = rc3_form((EXAMPLES / "valid" / "ApplicationDeployment-helm.yaml").read_bytes())
    assert rc3_errors("appDeploymentManifest", doc) == []
    dep = parse_deployment(yaml.safe_dump(doc).encode(), source="rc3")
    assert dep.form is DocumentForm.RC3 and dep.device_id == "edge-1"
    assert dep.deployment_id == "a3e2f5dc-912e-494f-8395-52cf3769bc06"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(id="x/../y"), "id"),
        (lambda d: d["spec"].update(applicationId="Not_Valid"), "spec.applicationId"),
        (lambda d: d["metadata"].pop("deviceId"), "metadata.deviceId"),
        (
            lambda d: d["spec"]["deploymentProfile"]["components"][0]["properties"].update(
                repository="https://example.com/chart"
            ),
            "spec.deploymentProfile.components[0].properties.repository",
        ),
        (
            lambda d: d["spec"]["deploymentProfile"]["components"][0]["properties"].update(
                revision="v1.2.3"
            ),
            "spec.deploymentProfile.components[0].properties.revision",
        ),
    ],
)
def test_rc3_form_errors_name_the_field(change: Any, field: str) -> None:
    doc = rc3_form((EXAMPLES / "valid" / "ApplicationDeployment-helm.yaml").read_bytes())
    change(doc)
    assert rc3_errors("appDeploymentManifest", doc) != [] or field == "id"
    with pytest.raises(DocumentError, match=f": {re.escape(field)}: "):
        parse_deployment(yaml.safe_dump(doc).encode(), source="rc3")


# ----------------------------------------------------------------- device documents


def test_the_capabilities_examples_predate_rc3() -> None:
    """model/examples' DeviceCapabilitiesManifest (valid and invalid) carry ``roles`` and a
    ``resources`` object, a model older than rc.3, which has ``cpus``/``memory``/... directly
    in ``properties``. Under rc.3's schema the "valid" one is still valid (properties are open
    and identity fields present); the invalid ones' faults sit inside ``resources``, which rc.3
    does not define, except -002, which lacks the required ``vendor``. We follow rc.3."""
    device = "northstarida.xtapro.k8s.edge"
    valid = json.loads((EXAMPLES / "valid" / "DeviceCapabilitiesManifest-001.json").read_text())
    body = {k: v for k, v in valid.items() if k not in ("apiVersion", "kind")}
    assert rc3_errors("DeviceCapabilitiesManifest", body) == []
    caps, labels = validate_capabilities(valid, device, device)
    assert caps["vendor"] == "Northstar Industrial devices" and labels == {}
    for n, refused in (("001", False), ("002", True), ("003", False)):
        doc = json.loads(
            (EXAMPLES / "invalid" / f"DeviceCapabilitiesManifest-{n}.json").read_text()
        )
        if refused:
            with pytest.raises(Problem) as exc:
                validate_capabilities(doc, device, device)
            assert exc.value.status == 422 and exc.value.errors == [
                {"field": "properties.vendor", "message": "is required (a string)"}
            ]
        else:
            validate_capabilities(doc, device, device)


def test_the_status_examples_against_rc3() -> None:
    """model/examples' "valid" DeploymentStatusManifest has no ``adoptedManifestVersion``,
    which rc.3 requires: refused (422 naming it). With it added, it passes. The invalid ones:
    -001 differs only in ``kind`` (rc.3 has no kind: accepted), -002 has state ``running``
    (422 naming status.state), -003 lacks ``deploymentId`` (422)."""
    dep = "a3e2f5dc-912e-494f-8395-52cf3769bc06"
    valid = json.loads((EXAMPLES / "valid" / "DeploymentStatusManifest-001.json").read_text())
    with pytest.raises(Problem) as exc:
        validate_status(valid, dep, "edge-1")
    assert exc.value.status == 422 and exc.value.errors[0]["field"] == "adoptedManifestVersion"
    valid["adoptedManifestVersion"] = 3
    assert rc3_errors("DeploymentStatusManifest", valid) == []
    assert validate_status(valid, dep, "edge-1")["components"][1]["error"]["code"] == (
        "ERR_IMAGE_PULL"
    )
    expected = {"001": None, "002": "status.state", "003": "deploymentId"}
    for n, field in expected.items():
        doc = json.loads((EXAMPLES / "invalid" / f"DeploymentStatusManifest-{n}.json").read_text())
        doc["adoptedManifestVersion"] = 3
        if field is None:
            validate_status(doc, dep, "edge-1")
            continue
        assert rc3_errors("DeploymentStatusManifest", doc) != []
        with pytest.raises(Problem) as exc:
            validate_status(doc, dep, "edge-1")
        assert exc.value.status == 422 and exc.value.errors[0]["field"] == field
