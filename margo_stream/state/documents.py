"""Margo ``ApplicationDeployment`` documents: parse, validate, resolve to a runtime spec.

Two forms are accepted (see MARGO.md and the margo/specification repository):

* **published** (desired-state.md, model/application-deployment.linkml.yaml):
  ``apiVersion: application.margo.org/v1alpha1``, ``kind: ApplicationDeployment``,
  ``metadata.annotations.{id, applicationId}``, ``metadata.{name, namespace}``, optional
  ``metadata.deviceId``; ``spec.deploymentProfile`` and ``spec.parameters``.
* **rc.3** (``appDeploymentManifest`` in workload-management-api-1.0.0-rc.3.yaml): no
  ``apiVersion``/``kind``; ``metadata.deviceId`` required; ``spec.applicationId`` required
  (``^[-a-z0-9]{1,200}$``); components carry ``repository`` (``oci://...``) and a SemVer
  ``revision``; ``x-<name>-extensions`` keys allowed on the spec, profile and components.

In both forms the deployment id is ``metadata.annotations.id`` and must be usable as a file
name. Profile types: ``compose``, ``helm.v3`` (rc.3's ``helm`` is read as ``helm.v3``) and our
own ``process``, whose component properties are ``command`` (list of strings, required),
``env`` (map), ``restart`` (always | on-failure | never) and ``workingDir``.

Parameters (``spec.parameters.<name>.{value, targets: [{pointer, components}]}``): for a
``process`` deployment the pointer ``ENV.NAME`` sets environment variable ``NAME`` on every
listed component; for compose/helm the pointer and the stringified value are added to the
component's properties (the runtime applies them: a ``--set`` path for helm, an environment
variable for compose).

Extra files (our extension): ``spec.files: [{name, digest}]``, or, to stay inside rc.3's closed
schema, ``spec.x-margo-stream-extensions.files``. Names are relative paths without ``..``;
each file travels as a content-addressed blob next to the document.

Theory of operation: YAML is composed to nodes (so every error can point at a line and column),
checked for duplicate keys and alias bombs, constructed with the safe loader, validated
structurally by pydantic models, then checked semantically by hand. Every failure is one
``DocumentError`` line: ``source:LINE:COLUMN: dotted.path: what is wrong``.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from margo_stream.errors import DocumentError
from margo_stream.state.digest import is_digest, sha256_digest, validate_digest
from margo_stream.state.spec import (
    ComponentSpec,
    DeploymentSpec,
    FileSpec,
    ProfileType,
    RestartPolicy,
)

PUBLISHED_API_VERSION = "application.margo.org/v1alpha1"
KIND = "ApplicationDeployment"
EXTENSION_KEY = "x-margo-stream-extensions"
MAX_DOCUMENT_BYTES = 1 << 20
MAX_NODES = 100_000  # after alias expansion; stops "billion laughs" documents

PROFILE_TYPES: dict[str, ProfileType] = {
    "compose": ProfileType.COMPOSE,
    "helm.v3": ProfileType.HELM,
    "helm": ProfileType.HELM,
    "process": ProfileType.PROCESS,
}
_ALLOWED_TYPES = "compose, helm.v3 (rc.3: helm), process"

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")
_APP_ID_RE = re.compile(r"[-a-z0-9]{1,200}")
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*(/\*)?")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXT_RE = re.compile(r"x-[a-z][a-z0-9-]*-extensions")
_OCI_RE = re.compile(r"oci://.+")
_SEMVER_RE = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:_([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
_TIMEOUT_RE = re.compile(r"\d+m\d+s")

Path = tuple[str | int, ...]


class DocumentForm(enum.StrEnum):
    PUBLISHED = "published"
    RC3 = "rc.3"


# --------------------------------------------------------------------------- public models


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileRef(_Frozen):
    """An extra file of a deployment: relative ``name`` and the digest of its bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid", from_attributes=True)

    name: str
    digest: str

    def to_spec(self) -> FileSpec:
        return FileSpec(name=self.name, digest=self.digest)


class ParameterTarget(_Frozen):
    pointer: str
    components: tuple[str, ...]


class Parameter(_Frozen):
    name: str
    value: str  # stringified: booleans as true/false, lists and maps as compact JSON
    targets: tuple[ParameterTarget, ...]


class Component(_Frozen):
    name: str
    # process profile
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
    working_dir: str | None = None
    # compose / helm: properties as given, values stringified, extensions left out
    properties: tuple[tuple[str, str], ...] = ()


class Deployment(_Frozen):
    """A validated ApplicationDeployment, either form, before parameters are applied."""

    form: DocumentForm
    deployment_id: str
    application_id: str
    name: str
    namespace: str
    device_id: str | None
    profile: ProfileType
    components: tuple[Component, ...]
    parameters: tuple[Parameter, ...] = ()
    files: tuple[FileRef, ...] = ()


# --------------------------------------------------------------------------- raw (wire) models


class _Raw(BaseModel):
    # extra="allow" so unknown keys can be reported by name with the allowed list
    model_config = ConfigDict(strict=True, extra="allow")


class _RawTarget(_Raw):
    pointer: str
    components: list[str]


class _RawParameter(_Raw):
    value: Any
    targets: list[_RawTarget]


class _RawComponent(_Raw):
    name: str
    properties: dict[str, Any]


class _RawProfile(_Raw):
    type: str
    components: list[_RawComponent]
    deviceConstraints: dict[str, Any] | None = None


class _RawFile(_Raw):
    name: str
    digest: str


class _RawSpec(_Raw):
    applicationId: str | None = None
    deploymentProfile: _RawProfile
    parameters: dict[str, _RawParameter] | None = None
    files: list[_RawFile] | None = None


class _RawMetadata(_Raw):
    annotations: dict[str, Any]
    name: str
    namespace: str
    deviceId: str | None = None
    labels: dict[str, Any] | None = None


class _RawDocument(_Raw):
    apiVersion: str | None = None
    kind: str | None = None
    id: str | None = None
    metadata: _RawMetadata
    spec: _RawSpec


class _RawProcess(_Raw):
    command: list[str]
    env: dict[str, str | bool | int | float] | None = None
    restart: str | None = None
    workingDir: str | None = None


# --------------------------------------------------------------------------- YAML and errors


def _show(value: object, limit: int = 60) -> str:
    """``repr(value)``, shortened so one message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def _type_name(value: object) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "sequence",
             dict: "mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def format_path(path: Sequence[str | int]) -> str:
    """``("spec", "deploymentProfile", "components", 0, "name")`` -> dotted form."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "<document>"


class _Context:
    """One document being checked: its source name and node tree, to turn paths into marks."""

    def __init__(self, source: str, node: yaml.Node) -> None:
        self.source = source
        self.node = node

    def _mark(self, path: Path) -> yaml.Mark:
        node = self.node
        for part in path:
            child = None
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                        child = value
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if 0 <= part < len(node.value):
                    child = node.value[part]
            if child is None:
                break
            node = child
        return node.start_mark

    def error(self, path: Path, message: str) -> DocumentError:
        mark = self._mark(path)
        return DocumentError(
            f"{self.source}:{mark.line + 1}:{mark.column + 1}: {format_path(path)}: {message}"
        )


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuse duplicate mapping keys, recursive aliases and documents that expand too far."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            m = node.start_mark
            raise DocumentError(f"{source}:{m.line + 1}:{m.column + 1}: recursive YAML alias")
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, yaml.Mark] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                    if k.value in seen:
                        m, first = k.start_mark, seen[k.value]
                        raise DocumentError(
                            f"{source}:{m.line + 1}:{m.column + 1}: duplicate key {k.value!r} "
                            f"(first at line {first.line + 1})"
                        )
                    seen[k.value] = k.start_mark
                total += size(k) + size(v)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        active.discard(key)
        if total > MAX_NODES:
            m = node.start_mark
            raise DocumentError(
                f"{source}:{m.line + 1}:{m.column + 1}: document expands to more than "
                f"{MAX_NODES} YAML nodes (alias bomb?)"
            )
        sizes[key] = total
        return total

    size(root)


def _load_yaml(data: bytes, source: str) -> list[tuple[yaml.Node, Any]]:
    """Every document of ``data`` as (node tree, constructed value); empty documents skipped."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"{source}: document is {len(data)} bytes, more than {MAX_DOCUMENT_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{source}: not UTF-8 (byte {exc.start}): {exc.reason}") from None
    docs: list[tuple[yaml.Node, Any]] = []
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            _check_nodes(node, source)
            value = loader.construct_document(node)
            if value is not None:
                docs.append((node, value))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "syntax error"
        if exc.context:
            cm = exc.context_mark
            started = f" (started at {cm.line + 1}:{cm.column + 1})" if cm and cm is not mark else ""
            what = f"{exc.context}{started}: {what}"
        where = f"{mark.line + 1}:{mark.column + 1}:" if mark else ""
        raise DocumentError(f"{source}:{where} invalid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise DocumentError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    return docs


def _validate(model: type[BaseModel], data: Any, ctx: _Context, prefix: Path) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        err = errors[0]
        loc = tuple(p for p in err["loc"] if p != "[key]")
        kind = err["type"]
        got = _type_name(err.get("input"))
        if kind == "missing":
            message = "required field is missing"
        elif kind in ("string_type", "str_type"):
            message = f"expected a string, got {got} (quote the value)"
        elif kind in ("list_type",):
            message = f"expected a sequence, got {got}"
        elif kind in ("dict_type", "model_type", "model_attributes_type"):
            message = f"expected a mapping, got {got}"
        else:
            message = err["msg"]
        if "[key]" in err["loc"]:
            message = f"key {err.get('input')!r}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        raise ctx.error(prefix + loc, message) from None


def _check_keys(ctx: _Context, path: Path, data: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in data:
        if key not in allowed and not (isinstance(key, str) and _EXT_RE.fullmatch(key)):
            raise ctx.error(
                path + (key,),
                f"unknown field {key!r}; allowed: {', '.join(allowed)} or x-<name>-extensions",
            )


def stringify(value: Any) -> str:
    """A parameter or property value as the string a runtime sees."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, _dt.date | _dt.datetime):
        return value.isoformat()
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def validate_file_name(name: str) -> str:
    """A relative path inside a deployment's files directory; raises ``ValueError`` otherwise."""
    if not name or len(name) > 255:
        raise ValueError("file name must be 1-255 characters")
    if "\x00" in name or "\\" in name:
        raise ValueError(f"file name {name!r} contains NUL or backslash")
    if name.startswith("/"):
        raise ValueError(f"file name {name!r} is absolute; use a relative path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"file name {name!r} has an empty, '.' or '..' path component")
    return name


def valid_id(value: str) -> bool:
    """A deployment or component id that is safe as a single file name component."""
    return _ID_RE.fullmatch(value) is not None and value not in (".", "..")


# --------------------------------------------------------------------------- semantic checks


def _build(ctx: _Context, data: Any) -> Deployment:
    if not isinstance(data, dict):
        raise ctx.error((), f"expected a mapping (an ApplicationDeployment), got {_type_name(data)}")
    raw: _RawDocument = _validate(_RawDocument, data, ctx, ())
    _check_keys(ctx, (), data, ("apiVersion", "kind", "id", "metadata", "spec"))
    spec_d = data["spec"]
    _check_keys(ctx, ("spec",), spec_d, ("applicationId", "deploymentProfile", "parameters", "files"))
    _check_keys(ctx, ("spec", "deploymentProfile"), spec_d["deploymentProfile"],
                ("type", "components", "deviceConstraints"))

    # form, ids
    if raw.apiVersion is not None or raw.kind is not None:
        form = DocumentForm.PUBLISHED
        if raw.apiVersion is None:
            raise ctx.error(("apiVersion",), f"required field is missing (expected {PUBLISHED_API_VERSION!r})")
        if raw.apiVersion != PUBLISHED_API_VERSION:
            raise ctx.error(("apiVersion",), f"unsupported apiVersion {_show(raw.apiVersion)}; expected {PUBLISHED_API_VERSION!r}")
        if raw.kind is None:
            raise ctx.error(("kind",), f"required field is missing (expected {KIND!r})")
        if raw.kind != KIND:
            raise ctx.error(("kind",), f"kind must be {KIND!r}, got {raw.kind!r}")
    else:
        form = DocumentForm.RC3
    ann = raw.metadata.annotations
    ann_path: Path = ("metadata", "annotations")
    dep_id = ann.get("id")
    if dep_id is None:
        raise ctx.error(ann_path + ("id",), "required field is missing (the deployment id)")
    if not isinstance(dep_id, str) or not valid_id(dep_id):
        raise ctx.error(ann_path + ("id",), f"deployment id {_show(dep_id)} must match [A-Za-z0-9._-]{{1,200}} (it names files)")
    if raw.id is not None and raw.id != dep_id:
        raise ctx.error(("id",), f"id {raw.id!r} differs from metadata.annotations.id {dep_id!r}")

    ann_app, spec_app = ann.get("applicationId"), raw.spec.applicationId
    if form is DocumentForm.PUBLISHED:
        app_path: Path = ann_path + ("applicationId",)
        app_id = ann_app
    else:
        app_path = ("spec", "applicationId")
        app_id = spec_app
        if raw.metadata.deviceId is None:
            raise ctx.error(("metadata", "deviceId"), "required field is missing (rc.3 form)")
    if app_id is None:
        raise ctx.error(app_path, "required field is missing")
    if not isinstance(app_id, str) or not _APP_ID_RE.fullmatch(app_id):
        raise ctx.error(app_path, f"applicationId {_show(app_id)} must match ^[-a-z0-9]{{1,200}}$")
    if ann_app is not None and spec_app is not None and ann_app != spec_app:
        raise ctx.error(("spec", "applicationId"), f"differs from metadata.annotations.applicationId {ann_app!r}")
    device_id = raw.metadata.deviceId
    if device_id is not None and not _DEVICE_ID_RE.fullmatch(device_id):
        raise ctx.error(("metadata", "deviceId"), f"device id {_show(device_id)} is not a Margo DeviceId")

    # profile and components
    prof_path: Path = ("spec", "deploymentProfile")
    type_name = raw.spec.deploymentProfile.type
    profile = PROFILE_TYPES.get(type_name)
    if profile is None:
        raise ctx.error(prof_path + ("type",), f"unknown deployment profile type {_show(type_name)}; allowed: {_ALLOWED_TYPES}")
    raw_components = raw.spec.deploymentProfile.components
    if not raw_components:
        raise ctx.error(prof_path + ("components",), "at least one component is required")
    components: list[Component] = []
    seen: set[str] = set()
    for i, (rc, rc_d) in enumerate(zip(raw_components, spec_d["deploymentProfile"]["components"], strict=True)):
        path = prof_path + ("components", i)
        _check_keys(ctx, path, rc_d, ("name", "properties"))
        if not valid_id(rc.name):
            raise ctx.error(path + ("name",), f"component name {_show(rc.name)} must match [A-Za-z0-9._-]{{1,200}}")
        if rc.name in seen:
            raise ctx.error(path + ("name",), f"duplicate component name {rc.name!r}")
        seen.add(rc.name)
        components.append(_component(ctx, path, rc, profile, form))

    parameters = _parameters(ctx, raw, spec_d, profile, components)
    files = _files(ctx, spec_d)
    return Deployment(
        form=form, deployment_id=dep_id, application_id=app_id, name=raw.metadata.name,
        namespace=raw.metadata.namespace, device_id=device_id, profile=profile,
        components=tuple(components), parameters=parameters, files=files,
    )


def _component(ctx: _Context, path: Path, rc: _RawComponent, profile: ProfileType,
               form: DocumentForm) -> Component:
    props = rc.properties
    ppath = path + ("properties",)
    if profile is ProfileType.PROCESS:
        proc: _RawProcess = _validate(_RawProcess, props, ctx, ppath)
        _check_keys(ctx, ppath, props, ("command", "env", "restart", "workingDir"))
        if not proc.command or not proc.command[0]:
            raise ctx.error(ppath + ("command",), "command must be a non-empty list of strings (program first)")
        env: dict[str, str] = {}
        for key, value in (proc.env or {}).items():
            if not _ENV_NAME_RE.fullmatch(key):
                raise ctx.error(ppath + ("env", key), f"invalid environment variable name {key!r}")
            env[key] = stringify(value)
        try:
            restart = RestartPolicy(proc.restart or RestartPolicy.ON_FAILURE)
        except ValueError:
            allowed = ", ".join(p.value for p in RestartPolicy)
            raise ctx.error(ppath + ("restart",), f"restart {proc.restart!r} is not one of: {allowed}") from None
        if proc.workingDir is not None and (not proc.workingDir or "\x00" in proc.workingDir):
            raise ctx.error(ppath + ("workingDir",), "workingDir must be a non-empty path")
        return Component(name=rc.name, command=tuple(proc.command), env=tuple(sorted(env.items())),
                         restart=restart, working_dir=proc.workingDir)
    if form is DocumentForm.RC3:
        _check_oci(ctx, ppath, props)
    out: dict[str, str] = {}
    for key, value in props.items():
        if _EXT_RE.fullmatch(key):
            continue
        if isinstance(value, dict | list) or value is None:
            raise ctx.error(ppath + (key,), f"expected a scalar value, got {_type_name(value)}")
        out[key] = stringify(value)
    return Component(name=rc.name, properties=tuple(sorted(out.items())))


def _check_oci(ctx: _Context, ppath: Path, props: Mapping[str, Any]) -> None:
    """rc.3 ComponentProperties: ``repository`` oci://, SemVer ``revision``, wait, timeout."""
    for key in ("repository", "revision"):
        if key not in props:
            raise ctx.error(ppath + (key,), "required field is missing (rc.3 form)")
        if not isinstance(props[key], str):
            raise ctx.error(ppath + (key,), f"expected a string, got {_type_name(props[key])} (quote the value)")
    if not _OCI_RE.fullmatch(props["repository"]):
        raise ctx.error(ppath + ("repository",), f"repository {props['repository']!r} must be an oci:// reference")
    if not _SEMVER_RE.fullmatch(props["revision"]):
        raise ctx.error(ppath + ("revision",), f"revision {props['revision']!r} must be SemVer 2.0 without a leading v")
    if "wait" in props and not isinstance(props["wait"], bool):
        raise ctx.error(ppath + ("wait",), f"wait must be a boolean, got {_type_name(props['wait'])}")
    timeout = props.get("timeout")
    if timeout is not None and not (isinstance(timeout, str) and _TIMEOUT_RE.fullmatch(timeout)):
        raise ctx.error(ppath + ("timeout",), f"timeout {timeout!r} must look like 8m30s")


def _parameters(ctx: _Context, raw: _RawDocument, spec_d: dict[str, Any], profile: ProfileType,
                components: list[Component]) -> tuple[Parameter, ...]:
    names = [c.name for c in components]
    props_of = {c.name: dict(c.properties) for c in components}
    owner: dict[tuple[str, str], str] = {}  # (component, pointer) -> parameter
    out: list[Parameter] = []
    for pname, param in (raw.spec.parameters or {}).items():
        path: Path = ("spec", "parameters", pname)
        _check_keys(ctx, path, spec_d["parameters"][pname], ("value", "targets"))
        if param.value is None:
            raise ctx.error(path + ("value",), "value is null; write '' for an empty value")
        targets: list[ParameterTarget] = []
        for t, target in enumerate(param.targets):
            tpath = path + ("targets", t)
            _check_keys(ctx, tpath, spec_d["parameters"][pname]["targets"][t], ("pointer", "components"))
            pointer = target.pointer
            if profile is ProfileType.PROCESS:
                env_name = pointer[4:] if pointer.startswith("ENV.") else ""
                if not _ENV_NAME_RE.fullmatch(env_name):
                    raise ctx.error(tpath + ("pointer",), f"bad pointer {pointer!r} for a process deployment: expected ENV.<NAME>, e.g. ENV.SITE_ID")
            elif not pointer or pointer != pointer.strip():
                raise ctx.error(tpath + ("pointer",), f"bad pointer {pointer!r}: must be non-empty without surrounding spaces")
            if not target.components:
                raise ctx.error(tpath + ("components",), "at least one component is required")
            for c, comp in enumerate(target.components):
                if comp not in names:
                    raise ctx.error(tpath + ("components", c), f"unknown component {comp!r}; components are: {', '.join(names)}")
                if pointer in props_of[comp]:
                    raise ctx.error(tpath + ("pointer",), f"pointer {pointer!r} collides with property {pointer!r} of component {comp!r}")
                if comp in target.components[:c]:
                    raise ctx.error(tpath + ("components", c), f"component {comp!r} is listed twice")
                previous = owner.setdefault((comp, pointer), pname)
                if previous != pname:
                    raise ctx.error(tpath + ("pointer",), f"pointer {pointer!r} of component {comp!r} is already set by parameter {previous!r}")
            targets.append(ParameterTarget(pointer=pointer, components=tuple(target.components)))
        out.append(Parameter(name=pname, value=stringify(param.value), targets=tuple(targets)))
    return tuple(out)


def _files(ctx: _Context, spec_d: dict[str, Any]) -> tuple[FileRef, ...]:
    ext = spec_d.get(EXTENSION_KEY)
    if isinstance(ext, dict) and "files" in ext:
        if "files" in spec_d:
            raise ctx.error(("spec", EXTENSION_KEY, "files"), "give files in spec.files or here, not both")
        path: Path = ("spec", EXTENSION_KEY, "files")
        raw_list = ext["files"]
        if not isinstance(raw_list, list):
            raise ctx.error(path, f"expected a sequence, got {_type_name(raw_list)}")
        for i, item in enumerate(raw_list):
            _validate(_RawFile, item, ctx, path + (i,))
    else:
        path = ("spec", "files")
        raw_list = spec_d.get("files") or []
    files: dict[str, FileRef] = {}
    for i, item in enumerate(raw_list):
        _check_keys(ctx, path + (i,), item, ("name", "digest"))
        name, digest = item["name"], item["digest"]
        try:
            validate_file_name(name)
        except ValueError as exc:
            raise ctx.error(path + (i, "name"), str(exc)) from None
        if not is_digest(digest):
            raise ctx.error(path + (i, "digest"), f"invalid digest {_show(digest)}: expected sha256:<64 lowercase hex>")
        if name in files:
            raise ctx.error(path + (i, "name"), f"duplicate file name {name!r}")
        files[name] = FileRef(name=name, digest=digest)
    return tuple(files[n] for n in sorted(files))


# --------------------------------------------------------------------------- public functions


def parse_deployments(data: bytes, source: str = "<input>") -> list[Deployment]:
    """Every ApplicationDeployment in ``data`` (multi-document YAML); ids must be unique."""
    docs = _load_yaml(data, source)
    if not docs:
        raise DocumentError(f"{source}: no YAML document found")
    out: list[Deployment] = []
    ids: set[str] = set()
    for node, value in docs:
        ctx = _Context(source, node)
        dep = _build(ctx, value)
        if dep.deployment_id in ids:
            raise ctx.error(("metadata", "annotations", "id"), f"duplicate deployment id {dep.deployment_id!r} in one file")
        ids.add(dep.deployment_id)
        out.append(dep)
    return out


def parse_deployment(data: bytes, *, source: str = "<input>") -> Deployment:
    """The single ApplicationDeployment in ``data``; raises ``DocumentError`` on any problem."""
    docs = _load_yaml(data, source)
    if not docs:
        raise DocumentError(f"{source}: no YAML document found")
    if len(docs) > 1:
        m = docs[1][0].start_mark
        raise DocumentError(
            f"{source}:{m.line + 1}:{m.column + 1}: {len(docs)} documents in one file; "
            "a deployment is one document (use parse_deployments for multi-document files)"
        )
    node, value = docs[0]
    return _build(_Context(source, node), value)


def resolve(deployment: Deployment, *, digest: str) -> DeploymentSpec:
    """Apply parameters and produce the frozen runtime spec; ``digest`` is the document's."""
    validate_digest(digest)
    env = {c.name: dict(c.env) for c in deployment.components}
    props = {c.name: dict(c.properties) for c in deployment.components}
    for param in deployment.parameters:
        for target in param.targets:
            for comp in target.components:
                if deployment.profile is ProfileType.PROCESS:
                    env[comp][target.pointer.removeprefix("ENV.")] = param.value
                else:
                    props[comp][target.pointer] = param.value
    components = tuple(
        ComponentSpec(
            deployment_id=deployment.deployment_id,
            name=c.name,
            profile=deployment.profile,
            command=c.command,
            env=tuple(sorted(env[c.name].items())),
            restart=c.restart,
            working_dir=c.working_dir,
            properties=tuple(sorted(props[c.name].items())),
        )
        for c in deployment.components
    )
    return DeploymentSpec(
        deployment_id=deployment.deployment_id,
        digest=digest,
        name=deployment.name,
        profile=deployment.profile,
        components=components,
        files=tuple(f.to_spec() for f in deployment.files),
    )


def load_spec(data: bytes, *, source: str = "<input>") -> DeploymentSpec:
    """Parse one document and resolve it with the digest of its exact bytes."""
    return resolve(parse_deployment(data, source=source), digest=sha256_digest(data))
