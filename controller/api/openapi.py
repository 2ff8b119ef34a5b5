"""The operator API as an OpenAPI 3.1 document, written by hand and served at
``/api/v1/openapi.json``. A unit test checks that every route of the app is described here and
every path here is routed, so the two cannot drift apart silently."""

from __future__ import annotations

from typing import Any

from controller.api.document_intake import MAX_DOCUMENTS, MAX_REQUEST_YAML_BYTES, PARSE_TIME_LIMIT
from margo_stream import __version__ as _version
from margo_stream.state.yaml_guard import MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_NODES

_PROBLEM = {"$ref": "#/components/responses/Problem"}
_ERRORS = {"400": _PROBLEM, "401": _PROBLEM, "403": _PROBLEM, "404": _PROBLEM, "503": _PROBLEM}


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _list_of(ref: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}}
        },
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_DEVICE_ID = {
    "name": "deviceId",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "device id (may contain '/')",
}
_TS = {"type": ["string", "null"], "format": "date-time"}

_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "format": "uri-reference"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    },
    "Device": {
        "type": "object",
        "required": [
            "id",
            "tenant",
            "connected",
            "capabilities",
            "labels",
            "reported_labels",
            "last_seen",
            "first_seen",
            "connection_count",
            "manifest_version",
            "stats",
        ],
        "properties": {
            "id": {"type": "string"},
            "tenant": {"type": "string"},
            "connected": {
                "type": "boolean",
                "description": "a live session exists now, on any controller sharing the store",
            },
            "controller": {
                "type": ["string", "null"],
                "description": "the controller instance holding the device's session (its"
                " lease); null when not connected",
            },
            "capabilities": {"type": "object", "description": "Margo device capabilities"},
            "labels": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "assigned by operators (PATCH .../labels); selectors match these",
            },
            "reported_labels": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "what the device reports of itself (hello, Margo capabilities); "
                "a selector reads them only as 'reported.<key>'",
            },
            "last_seen": _TS,
            "first_seen": _TS,
            "connection_count": {"type": "integer"},
            "manifest_version": {"type": ["integer", "null"]},
            "stats": {"type": "object", "description": "telemetry buffer fill, drop counters"},
            "remote": {"type": "string", "description": "peer address, only when connected"},
            "connected_since": {"type": "string", "format": "date-time"},
            "state": {
                "type": "string",
                "enum": ["allowed", "revoked", "unknown"],
                "description": "the identity on the tenant's allow-list (unknown: not on it)",
            },
            "not_after": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "expiry of the identity's newest certificate issued or seen",
            },
        },
    },
    "Identity": {
        "type": "object",
        "required": ["id", "state", "not_after"],
        "properties": {
            "id": {"type": "string"},
            "state": {"type": "string", "enum": ["allowed", "revoked"]},
            "not_after": {"type": "string", "format": "date-time"},
        },
    },
    "Deployment": {
        "type": "object",
        "required": [
            "deploymentId",
            "device",
            "state",
            "components",
            "manifestVersion",
            "error",
            "updated_at",
        ],
        "properties": {
            "deploymentId": {"type": "string"},
            "device": {"type": "string"},
            "digest": {"type": ["string", "null"]},
            "assigned": {"type": "boolean"},
            "state": {
                "type": "string",
                "enum": ["pending", "installing", "installed", "failed", "removing", "removed"],
            },
            "components": {"type": "array", "items": {"type": "object"}},
            "manifestVersion": {"type": ["integer", "null"]},
            "error": {"type": ["object", "null"]},
            "updated_at": _TS,
        },
    },
    "ApplyRequest": {
        "type": "object",
        "required": ["documents"],
        "properties": {
            "documents": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Margo ApplicationDeployment YAML documents",
            },
            "devices": {"type": "array", "items": {"type": "string"}},
            "selector": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "every label must match: 'key' an operator label, "
                "'reported.key' a label the device reports of itself",
            },
        },
    },
    "LabelsPatch": {
        "type": "object",
        "required": ["labels"],
        "properties": {
            "labels": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {
                    "type": ["string", "null"],
                    "pattern": "^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$",
                    "minLength": 1,
                    "maxLength": 63,
                },
                "propertyNames": {
                    "pattern": "^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$",
                    "maxLength": 128,
                    "not": {"pattern": "^reported\\."},
                },
                "description": "merged into the operator labels: a string sets the key, null "
                "removes it (JSON merge patch); at most 64 labels per device",
            },
        },
    },
    "ApplyResult": {
        "type": "object",
        "properties": {
            "deployments": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "deploymentId": {"type": "string"},
                        "digest": {"type": "string"},
                        "name": {"type": "string"},
                        "profile": {"type": "string"},
                    },
                },
            },
            "devices": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Event": {
        "type": "object",
        "required": ["id", "ts", "kind", "device", "payload"],
        "properties": {
            "id": {"type": "integer"},
            "ts": {"type": "string", "format": "date-time"},
            "kind": {"type": "string"},
            "device": {"type": ["string", "null"]},
            "payload": {"type": "object"},
        },
    },
    "TelemetryRecord": {
        "type": "object",
        "required": ["seq", "stream", "received_at"],
        "additionalProperties": True,
        "description": "seq, stream and received_at, then the record's own fields",
        "properties": {
            "seq": {"type": "integer"},
            "stream": {"type": "string"},
            "received_at": {"type": "string", "format": "date-time"},
        },
    },
    "Session": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "device": {"type": "string"},
            "operator": {"type": "string"},
            "command": {"type": ["string", "null"]},
            "started_at": _TS,
            "ended_at": _TS,
            "active": {"type": "boolean"},
            "bytes_in": {"type": "integer"},
            "bytes_out": {"type": "integer"},
            "exit_status": {
                "type": ["integer", "null"],
                "description": "the command's exit status; -N: killed by signal N",
            },
            "reason": {"type": ["string", "null"]},
        },
    },
    "Operator": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "roles": {
                "type": "array",
                "items": {"enum": ["viewer", "deployer", "terminal", "admin"]},
            },
            "expires": _TS,
        },
    },
}

_PATHS: dict[str, Any] = {
    "/healthz": {
        "get": {
            "summary": "Liveness (no authentication)",
            "security": [],
            "responses": {"200": _ok({"type": "object"})},
        },
    },
    "/api/v1/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": _ok({"type": "object"}), "401": _PROBLEM},
        },
    },
    "/api/v1/devices": {
        "get": {
            "summary": "The tenant's devices",
            "responses": {"200": _ok(_list_of("Device")), **_ERRORS},
        },
    },
    "/api/v1/devices/{deviceId}": {
        "get": {
            "summary": "One device",
            "parameters": [_DEVICE_ID],
            "responses": {"200": _ok({"$ref": "#/components/schemas/Device"}), **_ERRORS},
        },
    },
    "/api/v1/devices/{deviceId}/labels": {
        "patch": {
            "summary": "Set or remove a device's operator labels (what selectors match)",
            "description": (
                "A bad key or value is refused whole with a 400 problem naming the label "
                "(kind invalid-label). Existing assignments stay; selectors use the new labels "
                "from the next apply. Needs the deployer role."
            ),
            "parameters": [_DEVICE_ID],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/LabelsPatch"}}
                },
            },
            "responses": {"200": _ok({"$ref": "#/components/schemas/Device"}), **_ERRORS},
        },
    },
    "/api/v1/devices/{deviceId}/revoke": {
        "post": {
            "summary": "Revoke a device identity (admin): its live session is closed at once, "
            "later handshakes are refused; it survives restarts",
            "parameters": [_DEVICE_ID],
            "responses": {"200": _ok({"$ref": "#/components/schemas/Identity"}), **_ERRORS},
        },
    },
    "/api/v1/devices/{deviceId}/allow": {
        "post": {
            "summary": "Allow a device identity (admin); a revoked one is refused (409): it "
            "must enrol again",
            "parameters": [_DEVICE_ID],
            "responses": {
                "200": _ok({"$ref": "#/components/schemas/Identity"}),
                "409": _PROBLEM,
                **_ERRORS,
            },
        },
    },
    "/api/v1/admin/reload": {
        "post": {
            "summary": "Re-read the tenants' CA bundles, fleet-manager certificates, operators "
            "and allow files (admin), as SIGHUP does; on failure (422) nothing changes",
            "responses": {"200": _ok({"type": "object"}), "422": _PROBLEM, **_ERRORS},
        },
    },
    "/api/v1/devices/{deviceId}/deployments/{deploymentId}": {
        "delete": {
            "summary": "Remove a deployment from a device (it leaves the device's manifest)",
            "parameters": [
                _DEVICE_ID,
                {
                    "name": "deploymentId",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                },
            ],
            "responses": {"204": {"description": "unassigned"}, **_ERRORS},
        },
    },
    "/api/v1/devices/{deviceId}/telemetry": {
        "get": {
            "summary": "Telemetry records stored for a device, ascending seq",
            "parameters": [
                _DEVICE_ID,
                _query("stream", {"type": "string"}, "only this stream"),
                _query(
                    "since",
                    {"type": "string"},
                    "RFC 3339, unix seconds or an age (5m, 2h); without it: the newest",
                ),
                _query("after", {"type": "integer"}, "only records with a higher seq"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "default 100"),
            ],
            "responses": {"200": _ok(_list_of("TelemetryRecord")), **_ERRORS},
        },
    },
    "/api/v1/deployments": {
        "get": {
            "summary": "Deployments per device: assignment and latest reported status",
            "parameters": [_query("device", {"type": "string"}, "only this device")],
            "responses": {"200": _ok(_list_of("Deployment")), **_ERRORS},
        },
        "post": {
            "summary": "Store deployment documents and assign them to devices",
            "description": (
                "The documents are parsed and validated in a worker thread within limits: "
                f"{MAX_REQUEST_YAML_BYTES >> 20} MiB of YAML and {MAX_DOCUMENTS} documents "
                f"per request, {MAX_DOCUMENT_BYTES >> 20} MiB, {MAX_DEPTH} levels of nesting "
                f"and {MAX_NODES} nodes per document, {PARSE_TIME_LIMIT:g} s in all (422 "
                "document-too-complex, 413 documents-too-large); the body itself is limited "
                "by --api-max-body (413 body-too-large)"
            ),
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ApplyRequest"}}
                },
            },
            "responses": {
                "200": _ok({"$ref": "#/components/schemas/ApplyResult"}),
                **_ERRORS,
                "413": _PROBLEM,
                "422": _PROBLEM,
            },
        },
    },
    "/api/v1/events": {
        "get": {
            "summary": "The tenant's event feed after a cursor",
            "parameters": [
                _query("after", {"type": "integer", "minimum": 0}, "event id cursor"),
                _query("limit", {"type": "integer", "minimum": 1}, "default 1000"),
            ],
            "responses": {"200": _ok(_list_of("Event")), **_ERRORS},
        },
    },
    "/api/v1/events/stream": {
        "get": {
            "summary": "The event feed as Server-Sent Events (id = event id; resumes from "
            "Last-Event-ID or ?after=)",
            "parameters": [
                _query(
                    "after",
                    {"type": "integer", "minimum": 0},
                    "event id cursor; without it (and Last-Event-ID) the stream "
                    "starts at the newest event; 0 replays everything",
                ),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1},
                    "close the stream after this many events",
                ),
            ],
            "responses": {
                "200": {
                    "description": "event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **_ERRORS,
            },
        },
    },
    "/api/v1/devices/{deviceId}/terminal": {
        "get": {
            "summary": "Terminal session on a device (WebSocket)",
            "description": (
                "Upgrade to a WebSocket. Operator -> controller: first a text message "
                '{"type":"open","command":[..]|null,"rows":R,"cols":C,"tty":bool}, then binary '
                '0x00+input bytes and text {"type":"resize","rows":R,"cols":C}, '
                '{"type":"eof"}, {"type":"close"}. Controller -> operator: text '
                '{"type":"opened","session":ID,"pid":PID}, binary 0x01+stdout / 0x02+stderr, and '
                'at the end {"type":"exit","status":N,"reason":..} (close 1000) or '
                '{"type":"error","code":KIND,"reason":..} (close 4400 bad request, 4404 no such '
                "device or not connected, 4403 refused by the device, 4408 no answer, 1012 "
                "controller shutting down). Every session gets an audit record "
                "(/api/v1/sessions)."
            ),
            "parameters": [_DEVICE_ID],
            "responses": {
                "101": {"description": "Switching Protocols: the session runs"},
                "426": _PROBLEM,
                "401": _PROBLEM,
            },
        },
    },
    "/api/v1/sessions": {
        "get": {
            "summary": "Terminal session audit, newest first",
            "parameters": [_query("limit", {"type": "integer", "minimum": 1}, "default 100")],
            "responses": {"200": _ok(_list_of("Session")), **_ERRORS},
        },
    },
    "/api/v1/operators": {
        "get": {
            "summary": "The tenant's operators: name, roles, certificate expiry (null: the "
            "tenant token)",
            "responses": {"200": _ok(_list_of("Operator")), **_ERRORS},
        },
    },
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "margo-stream operator API",
            "version": _version,
            "description": "Every route under /api/v1 works inside the tenant of the operator "
            "token presented. Errors are RFC 9457 problem details.",
        },
        "servers": [{"url": "/"}],
        "security": [{"operatorToken": []}],
        "paths": _PATHS,
        "components": {
            "securitySchemes": {"operatorToken": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
            "responses": {
                "Problem": {
                    "description": "problem details",
                    "content": {
                        "application/problem+json": {
                            "schema": {"$ref": "#/components/schemas/Problem"}
                        }
                    },
                }
            },
        },
    }
