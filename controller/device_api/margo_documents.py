"""Margo rc.3's device documents as they arrive: a ``DeploymentStatusManifest`` or a
``DeviceCapabilitiesManifest`` checked and normalised once, for every device-facing transport,
against the identity the transport verified.

Answers, in Margo's registered problem types (problem-types.md): a body that is not a JSON
object is 400 ``invalid-request``; a JSON object that breaks rc.3's schema or its rules (a
missing or mistyped field, a state outside the enum, a capability outside its enum) is 422
``semantic-error`` with ``errors: [{field, message}]``; a document about a device the client
may not speak for is 403 ``not-authorized``.

Who may speak for which device: the client certificate's device ``D`` reports its own status
and capabilities, and, as a see-thru gateway (device-capabilities.md, "Gateways
considerations"), the capabilities of the devices behind it: any ``deviceId`` under ``D/``
(``D/child``, ``D/child/grandchild``). A child's parent must have reported its capabilities
first, or the answer is 404 ``gateway-not-found`` (the backend checks that).
"""

from __future__ import annotations

import math
from typing import Any

from controller.problems import Problem
from margo_stream.state.capabilities import CapabilityError, validate_document
from margo_stream.state.manifest import MAX_VERSION
from margo_stream.state.status import DeploymentState

STATES = frozenset(s.value for s in DeploymentState)


def field_error(field: str, message: str) -> Problem:
    """A 422 ``semantic-error`` about one field of a request body (400 ``invalid-request``
    when the body itself is not a JSON object)."""
    if field == "(body)":
        return Problem(400, f"the body {message}", kind="invalid-request")
    return Problem(
        422,
        f"{field}: {message}",
        kind="semantic-error",
        errors=[{"field": field, "message": message}],
    )


def _forbidden(detail: str) -> Problem:
    return Problem(403, detail, kind="not-authorized")


def may_speak_for(client_device: str, device_id: str) -> bool:
    """Whether the client certificate's device may report for ``device_id``: itself, or a
    device behind it as a see-thru gateway (``client_device/...``)."""
    return device_id == client_device or device_id.startswith(client_device + "/")


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
        raise field_error(
            "deploymentId",
            f"{doc['deploymentId'][:80]!r} differs from the path's {deployment_id[:80]!r}",
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
    """Margo rc.3 ``DeviceCapabilitiesManifest`` for ``path_device_id``, sent by the client
    certificate's ``device_id`` -> (capability properties plus extension objects, string
    labels).

    The labels are the device's claim about itself: the caller stores them as its reported
    labels, never as the operator labels that selectors match (``controller.labels``)."""
    if not may_speak_for(device_id, path_device_id):
        raise _forbidden(
            f"deviceId {path_device_id[:80]!r} is neither the client certificate's device "
            f"{device_id!r} nor a device behind it ({device_id}/...)"
        )
    try:
        caps, labels = validate_document(doc)
    except CapabilityError as exc:
        raise field_error(exc.field, exc.message) from None
    if caps["id"] != path_device_id:
        raise field_error(
            "properties.id", f"{caps['id'][:80]!r} differs from the path's {path_device_id!r}"
        )
    return caps, labels


__all__ = ["STATES", "field_error", "may_speak_for", "validate_capabilities", "validate_status"]
