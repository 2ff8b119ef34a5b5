"""One validator: every document the agent refuses, the controller's API refuses too (and what
the API accepts, the agent accepts). The API runs with its real SQLite store; the agent side is
``agent.desired_specs.read_specs``, what the agent runs on every pushed manifest."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

import httpx
import pytest

from agent.desired_specs import check_specs, read_specs
from controller.api.app import create_app
from controller.registry import SessionRegistry
from controller.store.sqlite import SqliteStore
from margo_stream.errors import DocumentError
from margo_stream.identity.operator_files import OperatorTable
from margo_stream.state.content_rules import check_spec
from margo_stream.state.manifest import Manifest, ManifestEntry
from margo_stream.state.spec import ComponentSpec, DeploymentSpec, ProfileType

pytestmark = pytest.mark.anyio
TOKEN = "acme-token-0123456789"
NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
FILE = b"services: {}\n"
FILE_DIGEST = "sha256:" + hashlib.sha256(FILE).hexdigest()


def process(*, dep: str = "svc", comp: str = "main", props: str = "", files: str = "") -> str:
    return f"""\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {{id: {dep!r}, applicationId: demo-app}}
  name: demo
  namespace: margo-poc
spec:
  deploymentProfile:
    type: process
    components:
      - name: {comp!r}
        properties:
          command: [sleep, "60"]
{props}{files}"""


def other(kind: str, props: str, files: str = "") -> str:
    return f"""\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {{id: stack, applicationId: demo-app}}
  name: demo
  namespace: margo-poc
spec:
  deploymentProfile:
    type: {kind}
    components:
      - name: app
        properties: {props}
{files}"""


def files(*names: str) -> str:
    return "  files:\n" + "".join(f"    - {{name: {n!r}, digest: {FILE_DIGEST}}}\n" for n in names)


WORKDIR_ESCAPE = process(props="          workingDir: a/../../..\n")

BAD = {
    "workingDir-escapes": WORKDIR_ESCAPE,
    "workingDir-parent": process(props="          workingDir: ../elsewhere\n"),
    "workingDir-deep-parent": process(props="          workingDir: x/y/../../../z\n"),
    "workingDir-nul": process(props='          workingDir: "a\\0b"\n'),
    "deployment-id-hidden": process(dep=".hidden"),
    "deployment-id-dotdot": process(dep=".."),
    "deployment-id-slash": process(dep="a/b"),
    "component-name-hidden": process(comp=".main"),
    "component-name-slash": process(comp="m/n"),
    "file-name-parent": process(files=files("../etc/passwd")),
    "file-name-absolute": process(files=files("/etc/passwd")),
    "file-name-backslash": process(files=files("a\\\\b")),
    "env-name": process(props="          env: {1BAD: x}\n"),
    "compose-file-escapes": other("compose", "{composeFile: ../../etc/shadow}", files("c.yaml")),
    "compose-file-not-listed": other("compose", "{composeFile: other.yaml}", files("c.yaml")),
    "helm-without-chart": other("helm.v3", "{revision: 1.2.3}"),
    "nested-too-deep": process(props="          env: " + "[" * 70 + "]" * 70 + "\n"),
}
GOOD = {
    "process": process(props="          workingDir: a/b/c\n          env: {A: b}\n"),
    "absolute-workdir": process(props="          workingDir: /srv/x\n"),
    "compose-file": other("compose", "{composeFile: c.yaml}", files("c.yaml")),
    "compose-inline": other("compose", "{compose: 'services: {}'}"),
    "helm": other("helm.v3", "{repository: oci://r.example/c, revision: 1.2.3}"),
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def api(tmp_path):
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    await store.device_connected(
        "acme",
        "d1",
        capabilities={"id": "d1"},
        reported_labels={},
        manifest_version=None,
        remote="127.0.0.1:1",
        now=1000.0,
    )
    app = create_app(
        store=store, registry=SessionRegistry(), operators=OperatorTable.admins({TOKEN: "acme"})
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client
    await store.close()


async def controller_verdict(client: httpx.AsyncClient, text: str) -> tuple[int, str]:
    # the file's blob goes with the document, so only the document itself is judged
    body = {"documents": [text], "devices": ["d1"], "blobs": [base64.b64encode(FILE).decode()]}
    resp = await client.post("/api/v1/deployments", json=body)
    detail = resp.json().get("detail", "") if resp.status_code != 200 else ""
    return resp.status_code, detail


def manifest_for(deployment_id: str, data: bytes) -> tuple[Manifest, dict[str, bytes]]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    manifest = Manifest(
        manifest_version=1,
        tenant="acme",
        device_id="d1",
        issued_at=NOW,
        expires=NOW + dt.timedelta(days=1),
        deployments=(ManifestEntry(deployment_id=deployment_id, digest=digest),),
    )
    return manifest, {digest: data}


def agent_verdict(text: str) -> str:
    """Why the agent refuses ``text`` pushed under a manifest entry ``x`` (the content is
    judged before the entry's id is compared with the document's)."""
    try:
        read_specs(*manifest_for("x", text.encode()))
    except DocumentError as exc:
        return str(exc)
    raise AssertionError("the agent accepted it")


@pytest.mark.parametrize("name", sorted(BAD))
async def test_both_ends_refuse_every_bad_document(api, name: str) -> None:
    text = BAD[name]
    status, detail = await controller_verdict(api, text)
    assert status == 422, (status, detail)
    assert detail and "\n" not in detail
    refusal = agent_verdict(text)
    assert "points at a document" not in refusal  # refused for the content, not the entry


@pytest.mark.parametrize("name", sorted(GOOD))
async def test_what_the_controller_accepts_the_agent_runs(api, name: str) -> None:
    text = GOOD[name]
    status, detail = await controller_verdict(api, text)
    assert status == 200, detail
    dep_id = "stack" if "id: stack" in text else "svc"
    assert [s.deployment_id for s in read_specs(*manifest_for(dep_id, text.encode()))] == [dep_id]


async def test_the_working_dir_that_froze_a_device_is_refused_by_the_api(api) -> None:
    status, detail = await controller_verdict(api, WORKDIR_ESCAPE)
    assert status == 422
    assert "workingDir" in detail and "has a '..' component" in detail
    assert detail.startswith("documents[0]:14:")  # located at the line of workingDir
    spec = DeploymentSpec(
        "svc",
        "sha256:" + "0" * 64,
        "svc",
        ProfileType.PROCESS,
        (ComponentSpec("svc", "main", ProfileType.PROCESS, ("true",), working_dir="a/../../.."),),
    )
    with pytest.raises(DocumentError, match="has a '..' component"):
        check_specs([spec])  # the agent's check on specs is the shared one
    with pytest.raises(DocumentError, match="has a '..' component"):
        check_spec(spec)
