"""Margo rc.3's device documents as they arrive: a ``DeploymentStatusManifest`` or a
``DeviceCapabilitiesManifest`` checked and normalised once, for every device-facing transport,
against the identity the transport verified (a document naming another device is a 403)."""

from __future__ import annotations

import math
from typing import Any

from controller.problems import Problem
from margo_stream.state.manifest import MAX_VERSION
from margo_stream.state.status import DeploymentState

STATES = frozenset(s.value for s in DeploymentState)
_CAP_ALLOWED = {"properties", "labels"}


def field_error(field: str, message: str) -> Problem:
    """A 400 problem about one field of a request body."""
    return Problem(
        400,
        f"{field}: {message}",
        title="Invalid request",
        kind="invalid-request",
        errors=[{"field": field, "message": message}],
    )


def _forbidden(detail: str) -> Problem:
    return Problem(403, detail, title="Forbidden", kind="forbidden")


def _version(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise field_error(field, "must be an integer in [1, 2^64-1]")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise field_error(field, "must be an integer in [1, 2^64-1]")
        value = int(value)
    if not 1 <= value <= MAX_VERSION:
        raise field_error(field, "must be an integer in [1, 2^64-1]")
    return value


def _error_obj(value: Any, field: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise field_error(field, "must be an object {code, source, message}")
    out = {}
    for key in ("code", "source", "message"):
        if key in value:
            if not isinstance(value[key], str):
                raise field_error(f"{field}.{key}", "must be a string")
            out[key] = value[key]
    return out


def validate_status(doc: Any, deployment_id: str, device_id: str) -> dict[str, Any]:
    """Margo rc.3 ``DeploymentStatusManifest``: a normalised copy, or a ``Problem``."""
    if not isinstance(doc, dict):
        raise field_error("(body)", "must be a JSON object")
    for key in ("deploymentId", "adoptedManifestVersion", "status", "components"):
        if key not in doc:
            raise field_error(key, "is required")
    if not isinstance(doc["deploymentId"], str) or not doc["deploymentId"]:
        raise field_error("deploymentId", "must be a non-empty string")
    if doc["deploymentId"] != deployment_id:
        raise Problem(
            422,
            f"deploymentId {doc['deploymentId'][:80]!r} differs from the path's "
            f"{deployment_id[:80]!r}",
            title="Unprocessable content",
            kind="deployment-id-mismatch",
        )
    if "deviceId" in doc and doc["deviceId"] != device_id:
        raise _forbidden("deviceId names another device than the client certificate's")
    out: dict[str, Any] = {
        "deploymentId": deployment_id,
        "deviceId": device_id,
        "adoptedManifestVersion": _version(doc["adoptedManifestVersion"], "adoptedManifestVersion"),
    }
    status = doc["status"]
    if not isinstance(status, dict) or status.get("state") not in STATES:
        raise field_error("status.state", f"must be one of {', '.join(sorted(STATES))}")
    out["status"] = {"state": status["state"]}
    if "error" in status:
        out["status"]["error"] = _error_obj(status["error"], "status.error")
    comps = doc["components"]
    if not isinstance(comps, list):
        raise field_error("components", "must be an array")
    out["components"] = []
    for i, comp in enumerate(comps):
        if not isinstance(comp, dict):
            raise field_error(f"components[{i}]", "must be an object")
        if not isinstance(comp.get("name"), str) or not comp["name"]:
            raise field_error(f"components[{i}].name", "is required (a non-empty string)")
        if comp.get("state") not in STATES:
            raise field_error(
                f"components[{i}].state", f"must be one of {', '.join(sorted(STATES))}"
            )
        item: dict[str, Any] = {"name": comp["name"], "state": comp["state"]}
        if "error" in comp:
            item["error"] = _error_obj(comp["error"], f"components[{i}].error")
        out["components"].append(item)
    return out


def validate_capabilities(
    doc: Any, path_device_id: str, device_id: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Margo rc.3 ``DeviceCapabilitiesManifest`` -> (capability properties, string labels).

    The labels are the device's claim about itself: the caller stores them as its reported
    labels, never as the operator labels that selectors match (``controller.labels``)."""
    if path_device_id != device_id:
        raise _forbidden(f"deviceId {path_device_id[:80]!r} is not the client certificate's device")
    if not isinstance(doc, dict):
        raise field_error("(body)", "must be a JSON object")
    for key in doc:
        if key not in _CAP_ALLOWED and not (key.startswith("x-") and key.endswith("-extensions")):
            raise field_error(key, "is not allowed (rc.3: properties, labels, x-<name>-extensions)")
    props = doc.get("properties")
    if not isinstance(props, dict):
        raise field_error("properties", "is required (an object)")
    for key in ("id", "vendor", "modelNumber", "serialNumber"):
        if not isinstance(props.get(key), str):
            raise field_error(f"properties.{key}", "is required (a string)")
    if props["id"] != device_id:
        raise _forbidden("properties.id is not the client certificate's device")
    labels_in = doc.get("labels", {})
    if not isinstance(labels_in, dict):
        raise field_error("labels", "must be an object")
    labels: dict[str, str] = {}
    for key, value in labels_in.items():
        if isinstance(value, list):
            labels[key] = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            labels[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            labels[key] = str(value)
        else:
            raise field_error(f"labels.{key}", "must be a string, number, boolean or array")
    return dict(props), labels


__all__ = ["STATES", "field_error", "validate_capabilities", "validate_status"]
