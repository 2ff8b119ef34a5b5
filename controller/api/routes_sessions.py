"""``/api/v1/sessions``: the audit of operator terminal sessions, newest first."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from controller.api.routes_common import context, int_param, rfc3339, tenant_of
from controller.store.base import SessionAudit


def session_item(audit: SessionAudit) -> dict[str, Any]:
    return {
        "id": audit.id,
        "device": audit.device_id,
        "operator": audit.operator,
        "command": audit.command,
        "started_at": rfc3339(audit.started_at),
        "ended_at": rfc3339(audit.ended_at),
        "active": audit.ended_at is None,
        "bytes_in": audit.bytes_in,
        "bytes_out": audit.bytes_out,
        "exit_status": audit.exit_status,
        "reason": audit.reason,
    }


async def list_sessions(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    limit = int_param(request, "limit", 100, minimum=1, maximum=10_000) or 100
    audits = await context(request).store.list_session_audits(tenant, limit)
    return JSONResponse({"items": [session_item(a) for a in audits]})


def routes() -> list[Route]:
    return [Route("/api/v1/sessions", list_sessions, methods=["GET"])]
