"""``/api/v1/devices/{id}/logs/{deployment}[/{component}]``: a workload's log, read from the
device over its connection (``controller.logs``).

* ``?tail=N`` (default 100, at most 10,000): the last N lines of each component's log, as
  ``text/plain; charset=utf-8``, one line each. When the deployment has several components and
  none is named, each line starts with ``[component] ``.
* ``?tail=N&follow=1``: ``text/event-stream``: the same lines, then each new one, one
  ``data:`` event per line, until the component's log ends (an ``event: end`` whose data is
  the reason, then the stream closes) or the client goes away (the device is told to stop).
  A comment line is sent as keepalive after ``KEEPALIVE`` seconds without a line.

Errors are problems: 400 for a bad name or parameter, 404 for an unknown device, deployment
or component, 409 when the device is not connected here (``device-not-connected``, or
``device-elsewhere`` naming the API of the controller that holds it), 503 when the device
refuses (too many log requests at once), 504 when it does not answer. Role ``viewer``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from controller.api.routes_common import context, int_param, tenant_of
from controller.logs import LogsReader, LogsRequest, LogsUnavailable, open_logs
from controller.problems import Problem
from margo_stream.protocol.messages import LOGS_MAX_TAIL, NAME_PATTERN

DEFAULT_TAIL = 100
KEEPALIVE = 5.0  # seconds; a write is also how a gone client is noticed
_NAME = re.compile(NAME_PATTERN)
_STATUS = {
    "not-found": (404, "not-found"),
    "not-connected": (409, "device-not-connected"),
    "elsewhere": (409, "device-elsewhere"),
    "refused": (503, "logs-refused"),
    "timeout": (504, "device-timeout"),
}


def _name(request: Request, key: str) -> str | None:
    value = request.path_params.get(key)
    if value is None:
        return None
    if not _NAME.match(value):
        raise Problem(400, f"invalid {key.replace('_', ' ')} {value!r}", kind="invalid-parameter")
    return str(value)


def _follow(request: Request) -> bool:
    raw = request.query_params.get("follow", "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise Problem(400, f"follow must be 1 or 0, got {raw!r}", kind="invalid-parameter")


def _prefix(reader: LogsReader, component: str) -> str:
    return f"[{component}] " if len(reader.components) > 1 else ""


async def _plain(reader: LogsReader) -> AsyncIterator[str]:
    try:
        async for component, lines in reader.batches():
            prefix = _prefix(reader, component)
            yield "".join(f"{prefix}{line}\n" for line in lines)
    finally:
        reader.close()


async def _events(reader: LogsReader) -> AsyncIterator[str]:
    try:
        yield f": logs of {', '.join(reader.components)}\n\n"
        async for component, lines in reader.batches(idle=KEEPALIVE):
            if not lines:
                yield ": keepalive\n\n"
                continue
            prefix = _prefix(reader, component)
            yield "".join(f"data: {prefix}{line}\n\n" for line in lines)
        reason = (reader.end_reason or "ended").replace("\n", " ")
        yield f"event: end\ndata: {reason}\n\n"
    finally:
        reader.close()


async def device_logs(request: Request) -> StreamingResponse:
    tenant = tenant_of(request)
    device_id = request.path_params["device_id"]
    deployment_id = _name(request, "deployment_id")
    assert deployment_id is not None
    component = _name(request, "component")
    tail = int_param(request, "tail", DEFAULT_TAIL, maximum=LOGS_MAX_TAIL)
    follow = _follow(request)
    ctx = context(request)
    wanted = LogsRequest(deployment_id, component, DEFAULT_TAIL if tail is None else tail, follow)
    try:
        reader = await open_logs(ctx.registry, ctx.store, tenant, device_id, wanted)
    except LogsUnavailable as exc:
        status, kind = _STATUS.get(exc.kind, (502, "logs-unavailable"))
        raise Problem(status, exc.reason, kind=kind) from None
    if follow:
        return StreamingResponse(
            _events(reader),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return StreamingResponse(_plain(reader), media_type="text/plain; charset=utf-8")


def routes() -> list[Route]:
    base = "/api/v1/devices/{device_id:path}/logs/{deployment_id}"
    return [
        Route(base + "/{component}", device_logs, methods=["GET"]),
        Route(base, device_logs, methods=["GET"]),
    ]


def openapi_paths() -> dict[str, Any]:
    """The logs routes in the operator API's OpenAPI document (``create_app`` adds them)."""
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in ("deviceId", "deploymentId")
    ]
    query = [
        {"name": "tail", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                    "maximum": LOGS_MAX_TAIL, "default": 100}},
        {"name": "follow", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}},
    ]  # fmt: skip
    problems = {
        str(code): {"description": "a problem (RFC 9457)"} for code in (400, 404, 409, 503, 504)
    }
    get = {
        "summary": "The last lines of a workload's log (text/plain), or with follow=1 each new"
        " line as a Server-Sent Event until the log ends (viewer)",
        "responses": {
            "200": {
                "description": "the lines",
                "content": {"text/plain": {}, "text/event-stream": {}},
            },
            **problems,
        },
    }
    component = {"name": "component", "in": "path", "required": True, "schema": {"type": "string"}}
    base = "/api/v1/devices/{deviceId}/logs/{deploymentId}"
    return {
        base: {"get": {**get, "parameters": [*params, *query]}},
        base + "/{component}": {"get": {**get, "parameters": [*params, component, *query]}},
    }
