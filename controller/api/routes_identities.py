"""Device identity lifecycle and reload (admin): ``POST /api/v1/devices/{id}/revoke`` and
``.../allow``, ``POST /api/v1/admin/reload``.

Revoking takes the identity off the allow-list in the store (it survives restarts) and closes
the device's live session at once; later handshakes are refused with ``revoked``. ``allow``
answers for an identity that is allowed and refuses a revoked one (409): a revoked identity
comes back only through a new enrolment (a new key). The answers are the identity's
``{"id", "state", "not_after"}``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from controller.api.routes_common import context, rfc3339, tenant_of
from controller.identities import IdentityBook, MustEnrolAgain
from controller.problems import Problem
from controller.store.base import IdentityRecord
from margo_stream.errors import ConfigError


def identity_item(record: IdentityRecord) -> dict[str, Any]:
    return {
        "id": record.device_id,
        "state": record.state,
        "not_after": rfc3339(record.not_after),
    }


def _book(request: Request) -> IdentityBook:
    book = context(request).identities
    if book is None:
        raise Problem(503, "this API serves no allow-list", kind="not-available")
    return book


async def revoke_device(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    record = await _book(request).revoke(tenant, request.path_params["device_id"])
    return JSONResponse(identity_item(record))


async def allow_device(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    try:
        record = await _book(request).allow_again(tenant, request.path_params["device_id"])
    except MustEnrolAgain as exc:
        raise Problem(409, str(exc), kind="revoked-identity") from None
    return JSONResponse(identity_item(record))


async def reload(request: Request) -> JSONResponse:
    tenant_of(request)
    reload_fn = context(request).reload
    if reload_fn is None:
        raise Problem(503, "this API cannot reload the controller", kind="not-available")
    try:
        report = await reload_fn()
    except ConfigError as exc:
        raise Problem(422, str(exc), kind="reload-failed") from None
    return JSONResponse(report)


def routes() -> list[Route]:
    return [
        Route("/api/v1/devices/{device_id:path}/revoke", revoke_device, methods=["POST"]),
        Route("/api/v1/devices/{device_id:path}/allow", allow_device, methods=["POST"]),
        Route("/api/v1/admin/reload", reload, methods=["POST"]),
    ]
