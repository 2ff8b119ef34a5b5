"""``/api/v1/events``: the tenant's event feed, as pages after a cursor or as Server-Sent
Events (``/api/v1/events/stream``) for ``margoctl watch``.

The stream resumes after ``?after=N`` or the ``Last-Event-ID`` header (each SSE ``id`` is the
event id; with neither it starts at the newest event, so only new ones are sent), sends a comment line as keepalive when nothing happened for ``KEEPALIVE`` seconds,
and ends after ``?limit=N`` events when asked (scripts and tests).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from controller.api.routes_common import context, int_param, rfc3339, tenant_of
from controller.problems import Problem
from controller.store.base import EventRecord

KEEPALIVE = 15.0
PAGE = 1000


def event_item(event: EventRecord) -> dict[str, Any]:
    return {
        "id": event.id,
        "ts": rfc3339(event.ts),
        "kind": event.kind,
        "device": event.device_id,
        "payload": event.payload,
    }


async def list_events(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    after = int_param(request, "after", 0) or 0
    limit = int_param(request, "limit", PAGE, minimum=1, maximum=10_000) or PAGE
    events = await context(request).store.list_events(tenant, after, limit)
    return JSONResponse(
        {
            "items": [event_item(e) for e in events],
            "next": events[-1].id if events else after,
        }
    )


def _sse(event: EventRecord) -> str:
    data = json.dumps(event_item(event), separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"


async def stream_events(request: Request) -> StreamingResponse:
    tenant = tenant_of(request)
    store = context(request).store
    after = int_param(request, "after", None)
    if after is None:
        last = request.headers.get("last-event-id", "").strip()
        if last:
            if not last.isdigit():
                raise Problem(400, f"invalid Last-Event-ID {last!r}", kind="invalid-parameter")
            after = int(last)
    # Without a cursor a live feed starts now; ``after=0`` replays the whole history.
    cursor = after if after is not None else await store.latest_event_id(tenant)
    limit = int_param(request, "limit", None, minimum=1)

    async def body() -> AsyncIterator[str]:
        nonlocal cursor
        sent = 0
        yield f"retry: 2000\n: events of tenant {tenant} after {cursor}\n\n"
        while limit is None or sent < limit:
            events = await store.wait_events(tenant, cursor, timeout=KEEPALIVE, limit=PAGE)
            if not events:
                yield ": keepalive\n\n"
                continue
            for event in events:
                yield _sse(event)
                cursor = event.id
                sent += 1
                if limit is not None and sent >= limit:
                    break

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def routes() -> list[Route]:
    return [
        Route("/api/v1/events", list_events, methods=["GET"]),
        Route("/api/v1/events/stream", stream_events, methods=["GET"]),
    ]
