"""Structural checks of an ApplicationDeployment, with errors that point at the YAML.

The raw models mirror the document's wire shape (both the published and the rc.3 form) and are
validated strictly by pydantic; ``validate_model`` turns the first pydantic error into one located
``DocumentError`` line. ``check_keys`` reports an unknown key by name with the allowed list
(``x-<name>-extensions`` keys are always allowed). Semantic rules live in ``documents.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from margo_stream.state.yaml_nodes import NodeContext, NodePath, yaml_type_name

EXT_RE = re.compile(r"x-[a-z][a-z0-9-]*-extensions")


class _Raw(BaseModel):
    # extra="allow" so unknown keys can be reported by name with the allowed list
    model_config = ConfigDict(strict=True, extra="allow")


class RawTarget(_Raw):
    pointer: str
    components: list[str]


class RawParameter(_Raw):
    value: Any
    targets: list[RawTarget]


class RawComponent(_Raw):
    name: str
    properties: dict[str, Any]


class RawProfile(_Raw):
    type: str
    components: list[RawComponent]
    deviceConstraints: dict[str, Any] | None = None


class RawFile(_Raw):
    name: str
    digest: str


class RawSpec(_Raw):
    applicationId: str | None = None
    deploymentProfile: RawProfile
    parameters: dict[str, RawParameter] | None = None
    files: list[RawFile] | None = None


class RawMetadata(_Raw):
    annotations: dict[str, Any]
    name: str
    namespace: str
    deviceId: str | None = None
    labels: dict[str, Any] | None = None


class RawDocument(_Raw):
    apiVersion: str | None = None
    kind: str | None = None
    id: str | None = None
    metadata: RawMetadata
    spec: RawSpec


class RawProcess(_Raw):
    command: list[str]
    env: dict[str, str | bool | int | float] | None = None
    restart: str | None = None
    workingDir: str | None = None


def validate_model(model: type[BaseModel], data: Any, ctx: NodeContext, prefix: NodePath) -> Any:
    """``data`` validated by ``model``; the first problem raised as a located ``DocumentError``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        err = errors[0]
        loc = tuple(p for p in err["loc"] if p != "[key]")
        kind = err["type"]
        got = yaml_type_name(err.get("input"))
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


def check_keys(
    ctx: NodeContext, path: NodePath, data: Mapping[str, Any], allowed: Sequence[str]
) -> None:
    """Refuse a key of ``data`` that is neither in ``allowed`` nor an ``x-<name>-extensions`` key."""
    for key in data:
        if key not in allowed and not (isinstance(key, str) and EXT_RE.fullmatch(key)):
            raise ctx.error(
                path + (key,),
                f"unknown field {key!r}; allowed: {', '.join(allowed)} or x-<name>-extensions",
            )
