"""Margo ApplicationDeployment documents: both forms, errors that point at the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from margo_stream.errors import DocumentError
from margo_stream.state.digest import digest_hex, sha256_digest, validate_digest
from margo_stream.state.documents import (
    DocumentForm,
    load_spec,
    parse_deployment,
    parse_deployments,
    resolve,
    validate_file_name,
)
from margo_stream.state.spec import ProfileType, RestartPolicy

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "documents"
VALID = sorted((DATA / "valid").glob("*.yaml"))
INVALID = sorted((DATA / "invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _expectations(path: Path) -> list[str]:
    return [
        line.split("expect:", 1)[1].strip()
        for line in path.read_text().splitlines()
        if line.startswith("# expect:")
    ]


# --------------------------------------------------------------------------- digests


def test_digest_form() -> None:
    d = sha256_digest(b"foo")
    assert d == "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    assert validate_digest(d) == d
    assert digest_hex(d) == d[7:]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sha256:",
        "sha256:" + "A" * 64,
        "sha512:" + "a" * 64,
        " sha256:" + "a" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        None,
        42,
    ],
)
def test_digest_rejects(bad: object) -> None:
    with pytest.raises(DocumentError, match="invalid digest"):
        validate_digest(bad)


@given(st.binary(max_size=256))
def test_digest_always_valid(data: bytes) -> None:
    assert validate_digest(sha256_digest(data))


# --------------------------------------------------------------------------- corpus


def test_corpus_is_not_empty() -> None:
    assert len(VALID) >= 5 and len(INVALID) >= 10 and len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", VALID + EXAMPLES, ids=lambda p: p.name)
def test_valid_documents_parse_and_resolve(path: Path) -> None:
    data = path.read_bytes()
    deployments = parse_deployments(data, str(path))
    assert deployments
    for dep in deployments:
        spec = resolve(dep, digest=sha256_digest(data))
        assert spec.deployment_id == dep.deployment_id
        assert [c.name for c in spec.components] == [c.name for c in dep.components]
        for comp in spec.components:
            assert list(comp.env) == sorted(comp.env)
            assert list(comp.properties) == sorted(comp.properties)
            if comp.profile is ProfileType.PROCESS:
                assert comp.command
    if len(deployments) == 1:
        assert parse_deployment(data, source=str(path)) == deployments[0]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_documents_name_the_problem(path: Path) -> None:
    expected = _expectations(path)
    assert expected, f"{path.name} has no '# expect:' line"
    with pytest.raises(DocumentError) as info:
        parse_deployments(path.read_bytes(), path.name)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


# --------------------------------------------------------------------------- forms


def test_published_and_rc3_forms() -> None:
    pub = parse_deployment((DATA / "valid" / "published-helm.yaml").read_bytes())
    assert pub.form is DocumentForm.PUBLISHED
    assert pub.application_id == "com-example-line-monitor"
    assert pub.profile is ProfileType.HELM
    rc3 = parse_deployment((DATA / "valid" / "rc3-helm.yaml").read_bytes())
    assert rc3.form is DocumentForm.RC3
    assert rc3.profile is ProfileType.HELM  # "helm" read as helm.v3
    assert rc3.application_id == "com-example-historian"
    assert rc3.device_id == "gateway-1/*"
    spec = resolve(rc3, digest=sha256_digest(b"x"))
    db = dict(spec.components[0].properties)
    assert db["settings.retention.days"] == "30"
    assert db["wait"] == "true"
    assert "x-acme-extensions" not in db


def test_helm_parameters_become_properties() -> None:
    spec = load_spec((ROOT / "examples" / "helm-digitron.yaml").read_bytes())
    db, orch = (dict(c.properties) for c in spec.components)
    assert db["settings.siteId"] == orch["settings.siteId"] == "SID-123-ABC"
    assert "administrator.name" in orch and "administrator.name" not in db
    assert db["repository"] == "oci://quay.io/charts/realtime-database-services"


def test_process_parameters_set_env() -> None:
    data = (DATA / "valid" / "process-with-files.yaml").read_bytes()
    dep = parse_deployment(data)
    spec = resolve(dep, digest=sha256_digest(data))
    writer, rotator = spec.components
    assert dict(writer.env) == {"GREETING": "bonjour", "LOG_LEVEL": "3", "PORT": "8080"}
    assert writer.env == tuple(sorted(writer.env))
    assert dict(rotator.env) == {"LOG_LEVEL": "3"}
    assert writer.restart is RestartPolicy.ALWAYS and rotator.restart is RestartPolicy.NEVER
    assert writer.working_dir == "/var/lib/logger" and rotator.working_dir is None
    assert writer.command[0] == "python3"
    assert [f.name for f in spec.files] == ["banner.txt", "config/logger.toml"]
    assert spec.digest == sha256_digest(data)


def test_changed_parameter_changes_component_spec() -> None:
    data = (ROOT / "examples" / "process-heartbeat.yaml").read_bytes()
    changed = data.replace(b"value: SID-123-ABC", b"value: SID-999")
    assert changed != data
    a, b = load_spec(data), load_spec(changed)
    assert dict(a.components[0].env)["SITE_ID"] == "SID-123-ABC"
    assert dict(b.components[0].env)["SITE_ID"] == "SID-999"
    assert a.components[0] != b.components[0]
    assert a.digest != b.digest
    # the same bytes give an equal (hashable, frozen) spec
    assert load_spec(data) == a and hash(load_spec(data)) == hash(a)


def test_extension_files_in_rc3() -> None:
    dep = parse_deployment((DATA / "valid" / "rc3-process-extension-files.yaml").read_bytes())
    assert [f.name for f in dep.files] == ["sampler.cfg"]


def test_multi_document_needs_parse_deployments() -> None:
    data = (DATA / "valid" / "multi.yaml").read_bytes()
    with pytest.raises(
        DocumentError, match=r"multi.yaml:\d+:\d+: 2 documents in one file.*parse_deployments"
    ):
        parse_deployment(data, source="multi.yaml")
    assert [d.deployment_id for d in parse_deployments(data, "multi.yaml")] == [
        "multi-1",
        "multi-2",
    ]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "no YAML document"),
        (b"---\n...\n", "no YAML document"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
        (b"a: [\n", r"<input>:2:1: invalid YAML"),
        (b"&a [*a]\n", "<input>:1:1: recursive YAML alias"),
        (b"a: &a {b: *a}\n", "recursive YAML alias"),
    ],
)
def test_unreadable_inputs(data: bytes, match: str) -> None:
    with pytest.raises(DocumentError, match=match):
        parse_deployment(data)


def test_parameter_conflicts_are_refused() -> None:
    doc = b"""
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata: {annotations: {applicationId: a, id: a}, name: a, namespace: n}
spec:
  deploymentProfile:
    type: compose
    components: [{name: c, properties: {packageLocation: p}}]
  parameters:
    one: {value: 1, targets: [{pointer: X, components: [c]}]}
    two: {value: 2, targets: [{pointer: X, components: [c]}]}
"""
    with pytest.raises(DocumentError, match="already set by parameter 'one'"):
        parse_deployment(doc)
    collide = doc.replace(
        b"pointer: X, components: [c]}]}\n    two",
        b"pointer: packageLocation, components: [c]}]}\n    two",
    )
    with pytest.raises(DocumentError, match="collides with property 'packageLocation'"):
        parse_deployment(collide)


def test_resolve_rejects_bad_digest() -> None:
    dep = parse_deployment((ROOT / "examples" / "compose-digitron.yaml").read_bytes())
    with pytest.raises(DocumentError, match="invalid digest"):
        resolve(dep, digest="md5:abc")


@pytest.mark.parametrize("name", ["a", "a/b.txt", "dir/sub/file-1.conf", "x..y"])
def test_file_names_accepted(name: str) -> None:
    assert validate_file_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "/abs", "../x", "a/../b", "a//b", "a/", "./a", "a\\b", "a\x00b"]
)
def test_file_names_refused(name: str) -> None:
    with pytest.raises(ValueError):
        validate_file_name(name)


_values = st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs",)), max_size=40)


@given(value=_values, other=_values)
def test_any_parameter_value_reaches_the_env(value: str, other: str) -> None:
    template = (ROOT / "examples" / "process-heartbeat.yaml").read_text()
    a = template.replace("value: SID-123-ABC", f"value: {json.dumps(value)}").encode()
    b = template.replace("value: SID-123-ABC", f"value: {json.dumps(other)}").encode()
    spec_a, spec_b = load_spec(a), load_spec(b)
    assert dict(spec_a.components[0].env)["SITE_ID"] == value
    assert (spec_a.components[0] == spec_b.components[0]) == (value == other)
