"""Margo rc.3's pull API of a real controller (``margo-controller --margo-api``) against the
rc.3 OpenAPI copied into tests/margo_rc3/: every body we send and get validated by its
schemas, bundles, capabilities PUT/DELETE for a device and a gateway's child, Margo's problem
types, schemathesis (positive and negative data) on every operation, and device constraints
steering an apply. Deviations the README lists ("Margo rc.3 deviations") are the only
allowances, each named where it is made."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance, status_code_conformance

from margo_stream.state.bundle import BUNDLE_MEDIA_TYPE, read_bundle
from tests.harness import Controller, signed_body

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RC3 = Path(__file__).resolve().parents[1] / "margo_rc3" / "workload-management-api-1.0.0-rc.3.yaml"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "process-heartbeat.yaml"
MARGO = "https://docs.margo.org/specification/problem-types#"
DEVICE, DEPLOYMENT = "edge-1", "heartbeat-0001"


def rc3_spec() -> dict[str, Any]:
    """The rc.3 OpenAPI, less the manifest's impossible ``required`` entries (``bundle.*``
    name top-level members no document has: README, first deviation)."""
    spec = yaml.safe_load(RC3.read_text())
    manifest = spec["components"]["schemas"]["UnsignedAppStateManifest"]
    manifest["required"] = [r for r in manifest["required"] if not r.startswith("bundle.")]
    return spec


SPEC = rc3_spec()


def check(name: str, doc: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]}
    jsonschema.Draft202012Validator(schema).validate(doc)


class Margo:
    """A device's HTTPS client for the controller's --margo-api."""

    def __init__(self, pki: Any, ctl: Controller, device: str) -> None:
        info = json.loads((ctl.data / "controller.json").read_text())
        self.base = f"https://127.0.0.1:{int(info['margo_api'].rsplit(':', 1)[1])}"
        ident = pki.device("acme", device)
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would replace our CA
        self.session.cert = (str(ident / "cert.pem"), str(ident / "key.pem"))
        self.session.verify = str(pki.dir / "controller" / "ca.pem")

    def __call__(self, method: str, path: str, **kw: Any) -> requests.Response:
        r = self.session.request(method, self.base + path, timeout=10, **kw)
        if r.headers.get("content-type") == "application/problem+json":
            check("ProblemDetail", r.json())
        return r

    def put_caps(self, device: str, doc: dict[str, Any]) -> requests.Response:
        return self("PUT", f"/api/v1/capabilities/{device}", json=doc)


def caps(device: str, **props: Any) -> dict[str, Any]:
    doc = {
        "properties": {
            "id": device,
            "vendor": "Acme",
            "modelNumber": "m1",
            "serialNumber": device,
            "cpus": [{"cores": 2, "architecture": "amd64"}],
            "memory": "2 Gi",
            "storage": "16Gi",
            "otelCollector": True,
            "supportedRuntimes": ["oci"],
            "supportedDeploymentTypes": ["compose"],
            **props,
        }
    }
    check("DeviceCapabilitiesManifest", doc)  # what we send is rc.3 too
    return doc


def apply(
    pki: Any, ctl: Controller, docs: list[str], devices: list[str], blobs: list[str] | None = None
) -> dict[str, Any]:
    body = signed_body(pki.token_file("acme"), docs, devices=devices, blobs=blobs or [])
    r = httpx.post(
        f"{ctl.api}/api/v1/deployments",
        json=body,
        headers={"Authorization": f"Bearer {pki.token('acme')}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


@pytest.fixture
def ctl(pki: Any, tmp_path: Path) -> Any:
    controller = Controller(pki, tmp_path / "data", extra=["--margo-api", "127.0.0.1:0"])
    try:
        yield controller
    finally:
        controller.stop()


def test_bundles_capabilities_and_problems(pki: Any, ctl: Controller) -> None:
    dev = Margo(pki, ctl, DEVICE)
    assert dev.put_caps(DEVICE, caps(DEVICE)).status_code == 201
    assert dev.put_caps(DEVICE, caps(DEVICE)).status_code == 200
    apply(pki, ctl, [EXAMPLE.read_text()], [DEVICE])

    r = dev("GET", "/api/v1/deployments")
    assert (
        r.status_code == 200
        and r.headers["content-type"] == "application/vnd.margo.manifest.v1+json"
    )
    manifest = r.json()
    check("UnsignedAppStateManifest", manifest)
    bundle = manifest["bundle"]
    assert bundle["mediaType"] == BUNDLE_MEDIA_TYPE
    assert bundle["url"] == f"/api/v1/bundles/{bundle['digest']}"
    b = dev("GET", bundle["url"])
    assert b.status_code == 200 and b.headers["content-type"] == BUNDLE_MEDIA_TYPE
    assert (
        b.headers["etag"] == f'"{bundle["digest"]}"' and "immutable" in b.headers["cache-control"]
    )
    assert "sha256:" + hashlib.sha256(b.content).hexdigest() == bundle["digest"]
    [entry] = manifest["deployments"]
    doc = dev("GET", entry["url"])
    assert read_bundle(b.content) == {f"{DEPLOYMENT}.yaml": doc.content}  # the exact bytes
    assert (
        dev("GET", bundle["url"], headers={"If-None-Match": b.headers["etag"]}).status_code == 304
    )
    assert dev("GET", "/api/v1/deployments").json()["bundle"]["digest"] == bundle["digest"]

    # another device of the tenant (and a made-up digest) never gets this bundle
    other = Margo(pki, ctl, "edge-2")
    assert other.put_caps("edge-2", caps("edge-2")).status_code == 201
    for client, url in ((other, bundle["url"]), (dev, "/api/v1/bundles/sha256:" + "0" * 64)):
        r = client("GET", url)
        assert r.status_code == 404 and r.json()["type"] == MARGO + "invalid-bundle"
    r = dev("GET", f"/api/v1/deployments/{DEPLOYMENT}/sha256:{'1' * 64}")
    assert r.status_code == 404 and r.json()["type"] == MARGO + "deployment-not-found"
    r = dev("GET", "/api/v1/deployments", headers={"Accept": "text/html"})
    assert r.status_code == 406 and r.json()["type"] == MARGO + "server-cannot-generate-response"

    # status: a bad enum is 422 naming the field
    status = {
        "deploymentId": DEPLOYMENT,
        "adoptedManifestVersion": manifest["manifestVersion"],
        "status": {"state": "sleeping"},
        "components": [],
    }
    r = dev("POST", f"/api/v1/deployments/{DEPLOYMENT}/status", json=status)
    assert r.status_code == 422 and r.json()["type"] == MARGO + "semantic-error"
    assert r.json()["errors"][0]["field"] == "status.state"
    status["status"] = {"state": "installed"}
    check("DeploymentStatusManifest", status)
    assert dev("POST", f"/api/v1/deployments/{DEPLOYMENT}/status", json=status).status_code == 200
    assert dev("POST", "/api/v1/deployments/x/status", data=b"{nope").status_code == 400

    # capabilities the issue found accepted
    for props, field in (
        ({"cpus": [{"cores": 2, "architecture": "x86_64"}]}, "properties.cpus[0].architecture"),
        ({"cpus": [{"architecture": "amd64"}]}, "properties.cpus[0].cores"),
        ({"peripherals": [{"type": "keyboard"}]}, "properties.peripherals[0].type"),
        ({"otelCollector": "yes"}, "properties.otelCollector"),
        ({"memory": 4}, "properties.memory"),
        ({"supportedRuntimes": []}, "properties.supportedRuntimes"),
    ):
        body = {"properties": {**caps(DEVICE)["properties"], **props}}
        with pytest.raises(jsonschema.ValidationError):
            check("DeviceCapabilitiesManifest", body)
        r = dev.put_caps(DEVICE, body)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == field, r.text

    # a gateway's child, DELETE, and who may do what
    child = f"{DEVICE}/cam-1"
    assert dev.put_caps(child, caps(child)).status_code == 201
    r = dev.put_caps("edge-2/cam-1", caps("edge-2/cam-1"))
    assert r.status_code == 403 and r.json()["type"] == MARGO + "not-authorized"
    r = other.put_caps("edge-2/nobody/x", caps("edge-2/nobody/x"))  # parent never reported
    assert r.status_code == 404 and r.json()["type"] == MARGO + "gateway-not-found"
    assert dev("DELETE", f"/api/v1/capabilities/{child}").status_code == 204
    r = dev("DELETE", f"/api/v1/capabilities/{child}")
    assert r.status_code == 404 and r.json()["type"] == MARGO + "device-not-found"
    r = dev("POST", f"/api/v1/capabilities/{DEVICE}", json={})
    assert r.status_code == 405 and r.headers["allow"] == "PUT, DELETE"
    assert dev("DELETE", "/api/v1/capabilities/edge-2").status_code == 403
    assert dev("DELETE", f"/api/v1/capabilities/{DEVICE}").status_code == 204
    assert dev.put_caps(DEVICE, caps(DEVICE)).status_code == 201

    run_schemathesis(dev, manifest["manifestVersion"])


def run_schemathesis(dev: Margo, version: int) -> None:
    """Every rc.3 operation, positive and negative data, against the live API. Our own checks
    replace two of schemathesis's: the status code must be one rc.3 lists for the operation or
    a documented deviation (README), and positive data may only be refused for a reason rc.3's
    schema cannot express."""
    schema = schemathesis.openapi.from_dict(copy.deepcopy(SPEC))
    deviations = {  # (method, path) -> statuses rc.3 does not list (README)
        ("POST", "/api/v1/deployments/{deploymentId}/status"): {409},
    }
    fixed = {"deviceId": DEVICE, "deploymentId": DEPLOYMENT}
    seen: dict[tuple[str, str], set[int]] = {}
    unsatisfiable: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        params = {p: v for p, v in fixed.items() if "{" + p + "}" in op.path}
        listed = {int(s) for s in op.definition.raw["responses"]}
        allowed = listed | deviations.get((op.method.upper(), op.path), set())
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = op.as_strategy(generation_mode=mode, path_parameters=params or None)
            if mode is GenerationMode.POSITIVE and op.path.startswith("/api/v1/capabilities"):
                # the schema cannot say that properties.id equals the path's deviceId
                strategy = strategy.map(lambda case: _own_id(case))

            try:
                _property_test(dev, op, mode, allowed, strategy, seen)()
            except Unsatisfiable:
                # negative mode for an operation whose every input is a free string
                assert mode is GenerationMode.NEGATIVE, op.path
                unsatisfiable.append(f"{op.method.upper()} {op.path}")
    # positive data reached the happy paths
    assert 200 in seen[("GET", "/api/v1/deployments")]
    assert seen[("PUT", "/api/v1/capabilities/{deviceId}")] & {200, 201}
    assert seen[("DELETE", "/api/v1/capabilities/{deviceId}")] & {204}
    # only the operations without a body: all their parameters are plain strings, so any value
    # is valid and there is no negative data to make
    assert unsatisfiable == [
        "DELETE /api/v1/capabilities/{deviceId}",
        "GET /api/v1/bundles/{digest}",
        "GET /api/v1/deployments",
        "GET /api/v1/deployments/{deploymentId}/{digest}",
    ]


def _property_test(
    dev: Margo,
    op: Any,
    mode: GenerationMode,
    allowed: set[int],
    strategy: Any,
    seen: dict[tuple[str, str], set[int]],
) -> Any:
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(
            base_url=dev.base, session=dev.session, verify=dev.session.verify, cert=dev.session.cert
        )
        key = (op.method.upper(), op.path)
        seen.setdefault(key, set()).add(response.status_code)
        assert response.status_code in allowed, (
            f"{key} {mode.value}: {response.status_code} {response.text[:300]}"
        )
        if response.headers.get("content-type") == "application/problem+json":
            check("ProblemDetail", response.json())
        case.validate_response(
            response, excluded_checks=[status_code_conformance, positive_data_acceptance]
        )

    return run


def _own_id(case: Any) -> Any:
    if isinstance(case.body, dict) and isinstance(case.body.get("properties"), dict):
        case.body["properties"]["id"] = DEVICE
    return case


HEAVY = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {applicationId: heavy, id: heavy-1}
  name: heavy
  namespace: demo
spec:
  deploymentProfile:
    type: process
    deviceConstraints:
      capacityRequirements: {memory: 4Gi, cpu: {cores: 1, architectures: [amd64]}}
      eligibilityRules:
        - labelSelector:
            matchExpressions: [{key: site, operator: In, values: [north]}]
    components:
      - name: main
        properties: {command: [sleep, "60"]}
"""


def test_device_constraints_steer_an_apply(pki: Any, ctl: Controller, tmp_path: Path) -> None:
    big, small = Margo(pki, ctl, "big-1"), Margo(pki, ctl, "small-1")
    assert (
        big.put_caps(
            "big-1", {**caps("big-1", memory="8 Gi"), "labels": {"site": "north"}}
        ).status_code
        == 201
    )
    assert (
        small.put_caps("small-1", {**caps("small-1"), "labels": {"site": "north"}}).status_code
        == 201
    )
    result = apply(pki, ctl, [HEAVY, EXAMPLE.read_text()], ["big-1", "small-1"])
    [skip] = result["skipped"]
    assert skip["device"] == "small-1" and skip["deploymentId"] == "heavy-1"
    assert skip["reason"].startswith("deviceConstraints.capacityRequirements.memory: needs 4Gi")

    def listed(client: Margo) -> set[str]:
        r = client("GET", "/api/v1/deployments")
        check("UnsignedAppStateManifest", r.json())
        return {d["deploymentId"] for d in r.json()["deployments"]}

    assert listed(big) == {"heavy-1", DEPLOYMENT}
    assert listed(small) == {DEPLOYMENT}
    r = ctl.get(pki.token("acme"), "/deployments", device="small-1")
    items = {i["deploymentId"]: i for i in r.json()["items"]}
    assert items["heavy-1"]["state"] == "failed"
    assert items["heavy-1"]["error"]["code"] == "constraint-unmet"
    assert "capacityRequirements.memory" in items["heavy-1"]["error"]["message"]
    assert items[DEPLOYMENT]["state"] == "pending"

    # the label rule names itself; a deployment of profile wasm needs the wasm runtime
    assert (
        big.put_caps(
            "big-1", {**caps("big-1", memory="8 Gi"), "labels": {"site": "south"}}
        ).status_code
        == 200
    )
    result = apply(pki, ctl, [HEAVY], ["big-1"])
    [skip] = result["skipped"]
    assert "eligibilityRules[0].labelSelector.matchExpressions[0]" in skip["reason"]
    module = b'(module (func (export "_start")) (memory (export "memory") 1))'
    digest = "sha256:" + hashlib.sha256(module).hexdigest()
    wasm = WASM.format(digest=digest)
    result = apply(pki, ctl, [wasm], ["small-1"], blobs=[base64.b64encode(module).decode()])
    [skip] = result["skipped"]
    assert skip["deploymentId"] == "tiny-1"
    assert skip["reason"].startswith("deploymentProfile.type: wasm needs a device reporting")


WASM = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {{applicationId: tiny, id: tiny-1}}
  name: tiny
  namespace: demo
spec:
  deploymentProfile:
    type: wasm
    components:
      - name: main
        properties: {{module: main.wat, restart: never}}
  files:
    - {{name: main.wat, digest: "{digest}"}}
"""
