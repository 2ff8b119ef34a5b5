"""``GET /api/v1/operators``: the tenant's operators (name, roles, certificate expiry), never
their tokens. The app keeps the operator directory in ``app.state.operators``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from controller.api.routes_common import tenant_of
from margo_stream.identity.authority import format_time
from margo_stream.identity.operator_files import Operators, Principal


def operator_document(principal: Principal) -> dict[str, object]:
    return {
        "name": principal.name,
        "roles": sorted(r.value for r in principal.roles),
        "expires": None if principal.expires is None else format_time(principal.expires),
    }


async def list_operators(request: Request) -> JSONResponse:
    operators: Operators = request.app.state.operators
    tenant = tenant_of(request)
    return JSONResponse({"items": [operator_document(p) for p in operators.operators(tenant)]})


def routes() -> list[Route]:
    return [Route("/api/v1/operators", list_operators, methods=["GET"])]
