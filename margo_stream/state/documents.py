"""Margo ``ApplicationDeployment`` documents: parse, validate, resolve to a runtime spec.

Two forms are accepted (file names below are in the margo/specification repository, under
``system-design/specification/margo-management-interface/`` and ``model/``):

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
own ``process`` (properties ``command``, a list of strings, required; ``env``, a map;
``restart``: always | on-failure | never; ``workingDir``) and ``wasm`` (``wasm_spec.py``).

Parameters (``spec.parameters.<name>.{value, targets: [{pointer, components}]}``): for a
``process`` or ``wasm`` deployment the pointer ``ENV.NAME`` sets environment variable ``NAME``
on every listed component; for compose/helm the pointer and the stringified value are added to
the component's properties (the runtime applies them: a ``--set`` path for helm, an
environment variable for compose).

Extra files (our extension): ``spec.files: [{name, digest}]``, or, to stay inside rc.3's closed
schema, ``spec.x-margo-stream-extensions.files``. Names are relative paths without ``..``;
each file travels as a content-addressed blob next to the document.

Theory of operation: YAML is composed to nodes (so every error can point at a line and column),
checked for duplicate keys and alias bombs, constructed with the safe loader (``yaml_nodes.py``),
validated structurally by pydantic models (``document_schema.py``), then checked semantically by
hand here. Every failure is one ``DocumentError`` line:
``source:LINE:COLUMN: dotted.path: what is wrong``.

rc.3 to the letter (``component_rules.py``): the deployment id may stand at the top level
(``id``, as rc.3's ``appDeploymentManifest`` and the specification's newer examples carry it)
instead of ``metadata.annotations.id``; ``deploymentProfile.deviceConstraints`` is validated
per rc.3 (``constraints.py``) and kept on the :class:`Deployment` for the controller's
matching; a profile type ``helm.v3`` is read as rc.3's ``helm`` and the parse result says so
in :attr:`Deployment.notes`.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from margo_stream.errors import DocumentError
from margo_stream.state.component_rules import check_oci, deployment_id, device_constraints
from margo_stream.state.constraints import DeviceConstraints
from margo_stream.state.content_rules import (
    ID_RULE,
    check_spec,
    valid_id,
    validate_file_name,
    working_dir_problem,
)
from margo_stream.state.digest import is_digest, sha256_digest, validate_digest
from margo_stream.state.document_schema import (
    EXT_RE,
    RawComponent,
    RawDocument,
    RawFile,
    RawProcess,
    check_keys,
    validate_model,
)
from margo_stream.state.spec import (
    ComponentSpec,
    DeploymentSpec,
    FileSpec,
    ProfileType,
    RestartPolicy,
)
from margo_stream.state.wasm_spec import check_modules, wasm_component
from margo_stream.state.yaml_guard import DEFAULT_LIMITS, YamlLimits
from margo_stream.state.yaml_nodes import (
    MAX_DOCUMENT_BYTES,
    MAX_NODES,
    NodeContext,
    NodePath,
    format_path,
    load_yaml,
    show,
    yaml_type_name,
)

# The public API; MAX_DOCUMENT_BYTES, MAX_NODES and format_path live in yaml_nodes.py,
# valid_id and validate_file_name in content_rules.py.
__all__ = [
    "EXTENSION_KEY",
    "KIND",
    "MAX_DOCUMENT_BYTES",
    "MAX_NODES",
    "PROFILE_TYPES",
    "PUBLISHED_API_VERSION",
    "Component",
    "Deployment",
    "DocumentForm",
    "FileRef",
    "Parameter",
    "ParameterTarget",
    "format_path",
    "load_spec",
    "parse_deployment",
    "parse_deployments",
    "resolve",
    "stringify",
    "valid_id",
    "validate_file_name",
]

PUBLISHED_API_VERSION = "application.margo.org/v1alpha1"
KIND = "ApplicationDeployment"
EXTENSION_KEY = "x-margo-stream-extensions"

PROFILE_TYPES: dict[str, ProfileType] = {
    "compose": ProfileType.COMPOSE,
    "helm.v3": ProfileType.HELM,
    "helm": ProfileType.HELM,
    "process": ProfileType.PROCESS,
    "wasm": ProfileType.WASM,
}
_ALLOWED_TYPES = "compose, helm.v3 (rc.3: helm), process, wasm"

_APP_ID_RE = re.compile(r"[-a-z0-9]{1,200}")
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*(/\*)?")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
    constraints: DeviceConstraints | None = None  # rc.3 deploymentProfile.deviceConstraints
    notes: tuple[str, ...] = ()  # how the document was read, where it needed saying


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


# --------------------------------------------------------------------------- semantic checks


def _build(ctx: NodeContext, data: Any) -> Deployment:
    if not isinstance(data, dict):
        raise ctx.error(
            (), f"expected a mapping (an ApplicationDeployment), got {yaml_type_name(data)}"
        )
    raw: RawDocument = validate_model(RawDocument, data, ctx, ())
    check_keys(ctx, (), data, ("apiVersion", "kind", "id", "metadata", "spec"))
    spec_d = data["spec"]
    check_keys(
        ctx, ("spec",), spec_d, ("applicationId", "deploymentProfile", "parameters", "files")
    )
    check_keys(
        ctx,
        ("spec", "deploymentProfile"),
        spec_d["deploymentProfile"],
        ("type", "components", "deviceConstraints"),
    )

    # form, ids
    if raw.apiVersion is not None or raw.kind is not None:
        form = DocumentForm.PUBLISHED
        if raw.apiVersion is None:
            raise ctx.error(
                ("apiVersion",), f"required field is missing (expected {PUBLISHED_API_VERSION!r})"
            )
        if raw.apiVersion != PUBLISHED_API_VERSION:
            raise ctx.error(
                ("apiVersion",),
                f"unsupported apiVersion {show(raw.apiVersion)}; expected {PUBLISHED_API_VERSION!r}",
            )
        if raw.kind is None:
            raise ctx.error(("kind",), f"required field is missing (expected {KIND!r})")
        if raw.kind != KIND:
            raise ctx.error(("kind",), f"kind must be {KIND!r}, got {raw.kind!r}")
    else:
        form = DocumentForm.RC3
    ann = raw.metadata.annotations
    ann_path: NodePath = ("metadata", "annotations")
    dep_id, id_path = deployment_id(ctx, ann, raw.id)
    if not isinstance(dep_id, str) or not valid_id(dep_id):
        raise ctx.error(
            id_path, f"deployment id {show(dep_id)} must match {ID_RULE} (it names files)"
        )

    ann_app, spec_app = ann.get("applicationId"), raw.spec.applicationId
    if form is DocumentForm.PUBLISHED:
        app_path: NodePath = ann_path + ("applicationId",)
        app_id = ann_app
    else:
        app_path = ("spec", "applicationId")
        app_id = spec_app
        if raw.metadata.deviceId is None:
            raise ctx.error(("metadata", "deviceId"), "required field is missing (rc.3 form)")
    if app_id is None:
        raise ctx.error(app_path, "required field is missing")
    if not isinstance(app_id, str) or not _APP_ID_RE.fullmatch(app_id):
        raise ctx.error(app_path, f"applicationId {show(app_id)} must match ^[-a-z0-9]{{1,200}}$")
    if ann_app is not None and spec_app is not None and ann_app != spec_app:
        raise ctx.error(
            ("spec", "applicationId"),
            f"differs from metadata.annotations.applicationId {ann_app!r}",
        )
    device_id = raw.metadata.deviceId
    if device_id is not None and not _DEVICE_ID_RE.fullmatch(device_id):
        raise ctx.error(
            ("metadata", "deviceId"), f"device id {show(device_id)} is not a Margo DeviceId"
        )

    # profile and components
    prof_path: NodePath = ("spec", "deploymentProfile")
    type_name = raw.spec.deploymentProfile.type
    profile = PROFILE_TYPES.get(type_name)
    if profile is None:
        raise ctx.error(
            prof_path + ("type",),
            f"unknown deployment profile type {show(type_name)}; allowed: {_ALLOWED_TYPES}",
        )
    helm_v3 = type_name == "helm.v3"
    notes = ("spec.deploymentProfile.type: 'helm.v3' read as rc.3's 'helm'",) if helm_v3 else ()
    constraints = device_constraints(ctx, prof_path, spec_d["deploymentProfile"])
    raw_components = raw.spec.deploymentProfile.components
    if not raw_components:
        raise ctx.error(prof_path + ("components",), "at least one component is required")
    components: list[Component] = []
    seen: set[str] = set()
    for i, (rc, rc_d) in enumerate(
        zip(raw_components, spec_d["deploymentProfile"]["components"], strict=True)
    ):
        path = prof_path + ("components", i)
        check_keys(ctx, path, rc_d, ("name", "properties"))
        if not valid_id(rc.name):
            raise ctx.error(
                path + ("name",),
                f"component name {show(rc.name)} must match {ID_RULE} (it names files)",
            )
        if rc.name in seen:
            raise ctx.error(path + ("name",), f"duplicate component name {rc.name!r}")
        seen.add(rc.name)
        components.append(_component(ctx, path, rc, profile, form))

    parameters = _parameters(ctx, raw, spec_d, profile, components)
    files = _files(ctx, spec_d)
    if profile is ProfileType.WASM:
        check_modules(ctx, prof_path, components, files)
    return Deployment(
        form=form,
        deployment_id=dep_id,
        application_id=app_id,
        name=raw.metadata.name,
        namespace=raw.metadata.namespace,
        device_id=device_id,
        profile=profile,
        components=tuple(components),
        parameters=parameters,
        files=files,
        constraints=constraints,
        notes=notes,
    )


def _component(
    ctx: NodeContext, path: NodePath, rc: RawComponent, profile: ProfileType, form: DocumentForm
) -> Component:
    props = rc.properties
    ppath = path + ("properties",)
    if profile is ProfileType.WASM:
        return Component(name=rc.name, **wasm_component(ctx, ppath, props))
    if profile is ProfileType.PROCESS:
        proc: RawProcess = validate_model(RawProcess, props, ctx, ppath)
        check_keys(ctx, ppath, props, ("command", "env", "restart", "workingDir"))
        if not proc.command or not proc.command[0]:
            raise ctx.error(
                ppath + ("command",), "command must be a non-empty list of strings (program first)"
            )
        env: dict[str, str] = {}
        for key, value in (proc.env or {}).items():
            if not _ENV_NAME_RE.fullmatch(key):
                raise ctx.error(ppath + ("env", key), f"invalid environment variable name {key!r}")
            env[key] = stringify(value)
        try:
            restart = RestartPolicy(proc.restart or RestartPolicy.ON_FAILURE)
        except ValueError:
            allowed = ", ".join(p.value for p in RestartPolicy)
            raise ctx.error(
                ppath + ("restart",), f"restart {proc.restart!r} is not one of: {allowed}"
            ) from None
        problem = None if proc.workingDir is None else working_dir_problem(proc.workingDir)
        if problem:
            raise ctx.error(ppath + ("workingDir",), problem)
        return Component(
            name=rc.name,
            command=tuple(proc.command),
            env=tuple(sorted(env.items())),
            restart=restart,
            working_dir=proc.workingDir,
        )
    if form is DocumentForm.RC3:
        check_oci(ctx, ppath, props)
    out: dict[str, str] = {}
    for key, value in props.items():
        if EXT_RE.fullmatch(key):
            continue
        if isinstance(value, dict | list) or value is None:
            raise ctx.error(ppath + (key,), f"expected a scalar value, got {yaml_type_name(value)}")
        out[key] = stringify(value)
    return Component(name=rc.name, properties=tuple(sorted(out.items())))


def _parameters(
    ctx: NodeContext,
    raw: RawDocument,
    spec_d: dict[str, Any],
    profile: ProfileType,
    components: list[Component],
) -> tuple[Parameter, ...]:
    names = [c.name for c in components]
    props_of = {c.name: dict(c.properties) for c in components}
    owner: dict[tuple[str, str], str] = {}  # (component, pointer) -> parameter
    out: list[Parameter] = []
    for pname, param in (raw.spec.parameters or {}).items():
        path: NodePath = ("spec", "parameters", pname)
        check_keys(ctx, path, spec_d["parameters"][pname], ("value", "targets"))
        if param.value is None:
            raise ctx.error(path + ("value",), "value is null; write '' for an empty value")
        targets: list[ParameterTarget] = []
        for t, target in enumerate(param.targets):
            tpath = path + ("targets", t)
            check_keys(
                ctx, tpath, spec_d["parameters"][pname]["targets"][t], ("pointer", "components")
            )
            pointer = target.pointer
            if profile in (ProfileType.PROCESS, ProfileType.WASM):
                env_name = pointer[4:] if pointer.startswith("ENV.") else ""
                if not _ENV_NAME_RE.fullmatch(env_name):
                    raise ctx.error(
                        tpath + ("pointer",),
                        f"bad pointer {pointer!r} for a {profile} deployment: expected ENV.<NAME>, e.g. ENV.SITE_ID",
                    )
            elif not pointer or pointer != pointer.strip():
                raise ctx.error(
                    tpath + ("pointer",),
                    f"bad pointer {pointer!r}: must be non-empty without surrounding spaces",
                )
            if not target.components:
                raise ctx.error(tpath + ("components",), "at least one component is required")
            for c, comp in enumerate(target.components):
                if comp not in names:
                    raise ctx.error(
                        tpath + ("components", c),
                        f"unknown component {comp!r}; components are: {', '.join(names)}",
                    )
                if pointer in props_of[comp]:
                    raise ctx.error(
                        tpath + ("pointer",),
                        f"pointer {pointer!r} collides with property {pointer!r} of component {comp!r}",
                    )
                if comp in target.components[:c]:
                    raise ctx.error(
                        tpath + ("components", c), f"component {comp!r} is listed twice"
                    )
                previous = owner.setdefault((comp, pointer), pname)
                if previous != pname:
                    raise ctx.error(
                        tpath + ("pointer",),
                        f"pointer {pointer!r} of component {comp!r} is already set by parameter {previous!r}",
                    )
            targets.append(ParameterTarget(pointer=pointer, components=tuple(target.components)))
        out.append(Parameter(name=pname, value=stringify(param.value), targets=tuple(targets)))
    return tuple(out)


def _files(ctx: NodeContext, spec_d: dict[str, Any]) -> tuple[FileRef, ...]:
    ext = spec_d.get(EXTENSION_KEY)
    if isinstance(ext, dict) and "files" in ext:
        if "files" in spec_d:
            raise ctx.error(
                ("spec", EXTENSION_KEY, "files"), "give files in spec.files or here, not both"
            )
        path: NodePath = ("spec", EXTENSION_KEY, "files")
        raw_list = ext["files"]
        if not isinstance(raw_list, list):
            raise ctx.error(path, f"expected a sequence, got {yaml_type_name(raw_list)}")
        for i, item in enumerate(raw_list):
            validate_model(RawFile, item, ctx, path + (i,))
    else:
        path = ("spec", "files")
        raw_list = spec_d.get("files") or []
    files: dict[str, FileRef] = {}
    for i, item in enumerate(raw_list):
        check_keys(ctx, path + (i,), item, ("name", "digest"))
        name, digest = item["name"], item["digest"]
        try:
            validate_file_name(name)
        except ValueError as exc:
            raise ctx.error(path + (i, "name"), str(exc)) from None
        if not is_digest(digest):
            raise ctx.error(
                path + (i, "digest"),
                f"invalid digest {show(digest)}: expected sha256:<64 lowercase hex>",
            )
        if name in files:
            raise ctx.error(path + (i, "name"), f"duplicate file name {name!r}")
        files[name] = FileRef(name=name, digest=digest)
    return tuple(files[n] for n in sorted(files))


# --------------------------------------------------------------------------- public functions


def _checked(dep: Deployment, data: bytes, source: str) -> Deployment:
    """``dep`` once the agents' rules passed on it resolved (``content_rules.check_spec``)."""
    try:
        check_spec(resolve(dep, digest=sha256_digest(data)))
    except DocumentError as exc:
        raise DocumentError(f"{source}: {exc}") from None
    return dep


def parse_deployments(
    data: bytes, source: str = "<input>", limits: YamlLimits = DEFAULT_LIMITS
) -> list[Deployment]:
    """Every ApplicationDeployment in ``data`` (multi-document YAML); ids must be unique."""
    docs = load_yaml(data, source, limits)
    if not docs:
        raise DocumentError(f"{source}: no YAML document found")
    out: list[Deployment] = []
    ids: set[str] = set()
    for node, value in docs:
        ctx = NodeContext(source, node)
        dep = _checked(_build(ctx, value), data, source)
        if dep.deployment_id in ids:
            raise ctx.error(
                ("metadata", "annotations", "id"),
                f"duplicate deployment id {dep.deployment_id!r} in one file",
            )
        ids.add(dep.deployment_id)
        out.append(dep)
    return out


def parse_deployment(
    data: bytes,
    *,
    source: str = "<input>",
    limits: YamlLimits = DEFAULT_LIMITS,
    events: Sequence[Any] | None = None,
) -> Deployment:
    """The single ApplicationDeployment in ``data``; raises ``DocumentError`` on any problem
    (``YamlLimitError`` when the YAML passes a limit of ``limits``). The controller and the
    agent both run exactly this, so what one accepts the other does. ``events``: see
    ``yaml_nodes.load_yaml``."""
    docs = load_yaml(data, source, limits, events=events)
    if not docs:
        raise DocumentError(f"{source}: no YAML document found")
    if len(docs) > 1:
        m = docs[1][0].start_mark
        raise DocumentError(
            f"{source}:{m.line + 1}:{m.column + 1}: {len(docs)} documents in one file; "
            "a deployment is one document (use parse_deployments for multi-document files)"
        )
    node, value = docs[0]
    return _checked(_build(NodeContext(source, node), value), data, source)


def resolve(deployment: Deployment, *, digest: str) -> DeploymentSpec:
    """Apply parameters and produce the frozen runtime spec; ``digest`` is the document's."""
    validate_digest(digest)
    env = {c.name: dict(c.env) for c in deployment.components}
    props = {c.name: dict(c.properties) for c in deployment.components}
    for param in deployment.parameters:
        for target in param.targets:
            for comp in target.components:
                if deployment.profile in (ProfileType.PROCESS, ProfileType.WASM):
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
