"""The rules a deployment's content must follow for an agent to lay it out and run it.

One set of rules for both ends: the controller runs them when an operator applies a document
(``documents.parse_deployment`` ends with :func:`check_spec` on the resolved deployment, after
the located checks that use the same predicates), and the agent runs :func:`check_spec` on
every deployment it is pushed (``agent.desired_specs``). So a document the controller accepts
is one every agent accepts; what an agent can only judge on the device itself (that an
absolute working directory exists, that a user exists, that a runtime's tool is installed)
stays with the agent.

- ids (deployment ids, component names) become single file names: :func:`valid_id`;
- file names are relative paths inside the deployment's files directory:
  :func:`validate_file_name`;
- a relative ``workingDir`` stays inside the deployment's directory: :func:`working_dir_problem`;
- a compose component's ``composeFile`` names one of the deployment's files, and a helm
  component names its chart (``repository``): :func:`property_problem`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import PurePosixPath

from margo_stream.errors import DocumentError
from margo_stream.state.spec import DeploymentSpec, ProfileType

# a single path component: no leading dot (no '.', '..' or hidden names), no separators
_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
ID_RULE = "[A-Za-z0-9._-]{1,200}, not starting with '.'"


def valid_id(value: str) -> bool:
    """A deployment or component id that is safe as a single file name component."""
    return _ID_RE.fullmatch(value) is not None


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


def working_dir_problem(value: str) -> str | None:
    """What is wrong with a process component's ``workingDir``, or None. A relative one is
    taken inside the deployment's directory and may not leave it; an absolute one belongs to
    the device (the agent checks that it exists)."""
    if not value or "\x00" in value:
        return "workingDir must be a non-empty path without NUL"
    path = PurePosixPath(value)
    if not path.is_absolute() and ".." in path.parts:
        return (
            f"working dir {value!r} has a '..' component; a relative working dir stays "
            "inside the deployment's directory"
        )
    return None


def property_problem(
    profile: ProfileType, properties: Mapping[str, str], files: Collection[str]
) -> tuple[str, str] | None:
    """(property, what is wrong) for a component's properties (parameters applied), or None."""
    if profile is ProfileType.COMPOSE and "composeFile" in properties:
        name = properties["composeFile"]
        try:
            validate_file_name(name)
        except ValueError as exc:
            return "composeFile", str(exc)
        if name not in files:
            listed = ", ".join(sorted(files)) or "none"
            return "composeFile", f"{name!r} is not one of the deployment's files ({listed})"
    if profile is ProfileType.HELM and not properties.get("repository"):
        return "repository", "a helm.v3 component needs its chart: properties.repository"
    return None


def check_spec(spec: DeploymentSpec) -> None:
    """Refuse a deployment no agent can lay out safely or run (raises ``DocumentError``)."""
    dep = spec.deployment_id
    if not valid_id(dep):
        raise DocumentError(f"deploymentId {dep!r} is not a safe name (it must match {ID_RULE})")
    files: set[str] = set()
    for f in spec.files:
        try:
            validate_file_name(f.name)
        except ValueError as exc:
            raise DocumentError(f"{dep}: file name {f.name!r} is not safe: {exc}") from None
        files.add(f.name)
    for comp in spec.components:
        if not valid_id(comp.name):
            raise DocumentError(
                f"{dep}: component name {comp.name!r} is not safe (it must match {ID_RULE})"
            )
        if comp.deployment_id != dep:
            raise DocumentError(
                f"{dep}: component {comp.name!r} names deployment {comp.deployment_id!r}"
            )
        if comp.working_dir is not None:
            problem = working_dir_problem(comp.working_dir)
            if problem:
                raise DocumentError(f"{dep}: component {comp.name!r}: {problem}")
        found = property_problem(comp.profile, dict(comp.properties), files)
        if found:
            raise DocumentError(f"{dep}: component {comp.name!r}: {found[0]}: {found[1]}")


__all__ = [
    "ID_RULE",
    "check_spec",
    "property_problem",
    "valid_id",
    "validate_file_name",
    "working_dir_problem",
]
