"""The ``wasm`` profile in deployment documents: what the parser accepts, resolves and refuses."""

from __future__ import annotations

import hashlib

import pytest

from margo_stream.errors import DocumentError
from margo_stream.state.documents import load_spec, parse_deployment
from margo_stream.state.spec import ProfileType, RestartPolicy
from margo_stream.state.wasm_spec import (
    DEFAULT_MEMORY,
    WasmLimits,
    parse_memory,
    parse_timeout,
)

DIGEST = "sha256:" + hashlib.sha256(b"(module)").hexdigest()


def doc(props: str, *, files: str | None = None, extra: str = "", published: bool = True) -> bytes:
    head = (
        "apiVersion: application.margo.org/v1alpha1\nkind: ApplicationDeployment\n"
        "metadata:\n  annotations: {applicationId: counter, id: counter-1}\n"
        if published
        else "metadata:\n  annotations: {id: counter-1}\n  deviceId: dev-1\n"
    )
    if files is None:
        files = f"  files:\n    - {{name: counter.wasm, digest: '{DIGEST}'}}\n"
    return (
        head
        + "  name: counter\n  namespace: test\nspec:\n"
        + ("" if published else "  applicationId: counter\n")
        + "  deploymentProfile:\n    type: wasm\n    components:\n"
        "      - name: counter\n        properties:\n" + props + files + extra
    ).encode()


ISSUE_EXAMPLE = (
    "          module: counter.wasm\n"
    "          args: [--out, result.txt]\n"
    "          env: {}\n"
    "          restart: never\n"
)


def test_the_issue_example_resolves_to_module_args_env_restart() -> None:
    spec = load_spec(doc(ISSUE_EXAMPLE))
    assert spec.profile is ProfileType.WASM
    (comp,) = spec.components
    assert comp.profile is ProfileType.WASM
    assert comp.command == ("counter.wasm", "--out", "result.txt")
    assert comp.env == () and comp.restart is RestartPolicy.NEVER
    assert comp.working_dir is None
    assert dict(comp.properties) == {"memoryLimit": str(DEFAULT_MEMORY)}
    assert [f.name for f in spec.files] == ["counter.wasm"]


def test_rc3_form_and_extension_files() -> None:
    files = (
        "  x-margo-stream-extensions:\n    files:\n"
        f"      - {{name: lib/counter.wat, digest: '{DIGEST}'}}\n"
    )
    spec = load_spec(doc("          module: lib/counter.wat\n", files=files, published=False))
    assert spec.components[0].command == ("lib/counter.wat",)
    assert spec.components[0].restart is RestartPolicy.ON_FAILURE


def test_limits_env_and_parameters() -> None:
    props = (
        "          module: counter.wasm\n"
        "          env: {GREETING: hi, DEBUG: true, N: 3}\n"
        "          memoryLimit: 16Mi\n"
        "          fuel: 1000000\n"
        "          timeout: 1m30s\n"
    )
    params = (
        "  parameters:\n    site:\n      value: SID-9\n"
        "      targets: [{pointer: ENV.SITE_ID, components: [counter]}]\n"
    )
    comp = load_spec(doc(props, extra=params)).components[0]
    assert dict(comp.env) == {"GREETING": "hi", "DEBUG": "true", "N": "3", "SITE_ID": "SID-9"}
    limits = WasmLimits.from_properties(dict(comp.properties))
    assert limits == WasmLimits(memory=16 << 20, fuel=1_000_000, timeout=90.0)


@pytest.mark.parametrize(
    ("props", "where", "what"),
    [
        ("          args: [a]\n", "properties.module", "required field is missing"),
        ("          module: counter.py\n", "properties.module", ".wasm (binary) or .wat"),
        ("          module: ../counter.wasm\n", "properties.module", "'..'"),
        (
            "          module: other.wasm\n",
            "properties.module",
            "not one of the deployment's files",
        ),
        ("          module: counter.wasm\n          command: [x]\n", "command", "unknown field"),
        ("          module: counter.wasm\n          args: a\n", "properties.args", "sequence"),
        (
            "          module: counter.wasm\n          env: {1X: a}\n",
            'env["1X"]',
            "invalid environment",
        ),
        ("          module: counter.wasm\n          restart: sometimes\n", "restart", "not one of"),
        ("          module: counter.wasm\n          memoryLimit: 5Gi\n", "memoryLimit", "4Gi"),
        ("          module: counter.wasm\n          memoryLimit: 1 GB\n", "memoryLimit", "<n>Mi"),
        ("          module: counter.wasm\n          fuel: 0\n", "fuel", "10^15"),
        ("          module: counter.wasm\n          fuel: '5'\n", "fuel", "integer"),
        ("          module: counter.wasm\n          timeout: soon\n", "timeout", "8m30s"),
        ("          module: counter.wasm\n          timeout: 8d\n", "timeout", "8m30s"),
        ("          module: counter.wasm\n          timeout: 0\n", "timeout", "more than 0"),
    ],
)
def test_refused_with_a_located_message(props: str, where: str, what: str) -> None:
    with pytest.raises(DocumentError) as err:
        parse_deployment(doc(props))
    assert where in str(err.value) and what in str(err.value), str(err.value)


def test_a_wasm_parameter_must_be_an_env_pointer() -> None:
    params = (
        "  parameters:\n    site:\n      value: x\n"
        "      targets: [{pointer: settings.site, components: [counter]}]\n"
    )
    with pytest.raises(DocumentError, match="for a wasm deployment: expected ENV"):
        parse_deployment(doc("          module: counter.wasm\n", extra=params))


def test_sizes_and_durations() -> None:
    assert parse_memory("64Ki") == 65536 and parse_memory(1 << 20) == 1 << 20
    assert parse_memory("2 Gi") == 2 << 30
    with pytest.raises(ValueError):
        parse_memory(1000)  # less than a page
    assert parse_timeout("1h") == 3600 and parse_timeout("45s") == 45
    assert parse_timeout("0.5s") == 0.5 and parse_timeout(2) == 2.0
    assert WasmLimits().to_properties() == (("memoryLimit", str(DEFAULT_MEMORY)),)
    props = dict(WasmLimits(memory=1 << 20, fuel=5, timeout=1.5).to_properties())
    assert WasmLimits.from_properties(props) == WasmLimits(memory=1 << 20, fuel=5, timeout=1.5)
