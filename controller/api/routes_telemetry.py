"""``/api/v1/devices/{id}/telemetry``: the telemetry records stored for a device.

Each item carries ``seq``, ``stream`` and ``received_at``, then the record's own fields at
top level (records are JSON objects; msgpack maps are read too). A record that is not an
object appears as ``value``; bytes that decode as neither appear as ``payload_b64``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from controller.api.routes_common import context, int_param, parse_time, rfc3339, tenant_of
from controller.store.base import TelemetryRecord

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000


def _decode(payload: bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        pass
    try:
        return True, msgpack.unpackb(payload, raw=False)
    except Exception:
        return False, None


def telemetry_item(record: TelemetryRecord) -> dict[str, Any]:
    item: dict[str, Any] = {}
    ok, value = _decode(record.payload)
    if not ok:
        item["payload_b64"] = base64.b64encode(record.payload).decode("ascii")
    elif isinstance(value, dict):
        item.update({str(k): v for k, v in value.items()})
    else:
        item["value"] = value
    item.update(seq=record.seq, stream=record.stream, received_at=rfc3339(record.received_at))
    # seq, stream and received_at first, then the record's fields
    return {
        "seq": item.pop("seq"),
        "stream": item.pop("stream"),
        "received_at": item.pop("received_at"),
        **item,
    }


async def device_telemetry(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    device_id = request.path_params["device_id"]
    stream = request.query_params.get("stream") or None
    since_raw = request.query_params.get("since") or None
    since = parse_time(since_raw, name="since") if since_raw else None
    after = int_param(request, "after", None)
    limit = int_param(request, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
    records = await context(request).store.query_telemetry(
        tenant, device_id, stream, since, limit or DEFAULT_LIMIT, after_seq=after
    )
    return JSONResponse({"items": [telemetry_item(r) for r in records]})


def routes() -> list[Route]:
    return [
        Route("/api/v1/devices/{device_id:path}/telemetry", device_telemetry, methods=["GET"]),
    ]
