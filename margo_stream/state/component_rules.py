"""Located checks of an ApplicationDeployment that follow rc.3's schema to the letter, kept
out of ``documents.py`` (which calls them): a component's OCI coordinates in the rc.3 form,
the deployment id's two places, and ``deviceConstraints`` (``constraints.py``).

Every failure is a located ``DocumentError`` (``ctx.error``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from margo_stream.state.constraints import (
    ConstraintError,
    DeviceConstraints,
    validate_constraints,
)
from margo_stream.state.yaml_nodes import NodeContext, NodePath, show, yaml_type_name

OCI_RE = re.compile(r"oci://.+")
SEMVER_RE = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:_([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
TIMEOUT_RE = re.compile(r"\d+m\d+s")
ID_PATH: NodePath = ("metadata", "annotations", "id")


def check_oci(ctx: NodeContext, ppath: NodePath, props: Mapping[str, Any]) -> None:
    """rc.3 ComponentProperties: ``repository`` oci://, SemVer ``revision``, wait, timeout."""
    for key in ("repository", "revision"):
        if key not in props:
            raise ctx.error(ppath + (key,), "required field is missing (rc.3 form)")
        if not isinstance(props[key], str):
            raise ctx.error(
                ppath + (key,),
                f"expected a string, got {yaml_type_name(props[key])} (quote the value)",
            )
    if not OCI_RE.fullmatch(props["repository"]):
        raise ctx.error(
            ppath + ("repository",),
            f"repository {props['repository']!r} must be an oci:// reference",
        )
    if not SEMVER_RE.fullmatch(props["revision"]):
        raise ctx.error(
            ppath + ("revision",),
            f"revision {props['revision']!r} must be SemVer 2.0 without a leading v",
        )
    if "wait" in props and not isinstance(props["wait"], bool):
        raise ctx.error(
            ppath + ("wait",), f"wait must be a boolean, got {yaml_type_name(props['wait'])}"
        )
    timeout = props.get("timeout")
    if timeout is not None and not (isinstance(timeout, str) and TIMEOUT_RE.fullmatch(timeout)):
        raise ctx.error(ppath + ("timeout",), f"timeout {timeout!r} must look like 8m30s")


def deployment_id(
    ctx: NodeContext, annotations: Mapping[str, Any], top_level: str | None
) -> tuple[Any, NodePath]:
    """The deployment id and where it was read: ``metadata.annotations.id`` (the published
    form, desired-state.md) or the top-level ``id`` (rc.3's ``appDeploymentManifest`` and the
    specification's newer examples). Both given must agree; neither is an error."""
    ann_id = annotations.get("id")
    if ann_id is None and top_level is None:
        raise ctx.error(
            ID_PATH,
            "required field is missing (the deployment id: metadata.annotations.id, or id at "
            "the top level as rc.3 carries it)",
        )
    if ann_id is not None and top_level is not None and ann_id != top_level:
        raise ctx.error(
            ("id",), f"id {top_level!r} differs from metadata.annotations.id {show(ann_id)}"
        )
    if ann_id is None:
        return top_level, ("id",)
    return ann_id, ID_PATH


def device_constraints(
    ctx: NodeContext, prof_path: NodePath, profile: Mapping[str, Any]
) -> DeviceConstraints | None:
    """``deploymentProfile.deviceConstraints`` validated per rc.3 (None when absent)."""
    if profile.get("deviceConstraints") is None:
        return None
    try:
        return validate_constraints(profile["deviceConstraints"])
    except ConstraintError as exc:
        raise ctx.error(prof_path + ("deviceConstraints", *exc.path), exc.message) from None


__all__ = ["OCI_RE", "SEMVER_RE", "TIMEOUT_RE", "check_oci", "deployment_id", "device_constraints"]
