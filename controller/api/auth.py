"""Operator authentication and the route policy: ``Authorization: Bearer <token>``.

Each token belongs to one operator of one tenant (``margo_stream.identity.operator_files``:
the tenant token is its ``admin``; named operators have the roles their certificate, signed by
the tenant's root, gives them). The middleware authenticates the token to that principal
(constant-time comparison against every token: timing says nothing about a guess), refuses an
expired certificate, and requires the role ``policy.required_role`` names for the request's
method and path (403 naming the missing role). Every route then works inside the principal's
tenant only (``scope["margo.tenant"]``); the principal itself is ``scope["margo.operator"]``.
"""

from __future__ import annotations

import datetime as dt

from starlette.types import ASGIApp, Receive, Scope, Send

from controller.api.policy import required_role
from controller.api.routes_common import TENANT_SCOPE_KEY, problem_response
from controller.problems import Problem
from margo_stream.identity.authority import format_time
from margo_stream.identity.operator_files import Operators, Principal

PRINCIPAL_SCOPE_KEY = "margo.operator"
PROTECTED_PREFIX = "/api/"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def principal_of(scope: Scope) -> Principal | None:
    """The authenticated operator of a request (None outside ``/api/``)."""
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    return principal if isinstance(principal, Principal) else None


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
            return None
    return None


class BearerAuthMiddleware:
    """Authenticates every HTTP and WebSocket request under ``/api/`` as one tenant's operator
    and enforces the route policy. ``operators`` is consulted on every request (the operator
    directory re-reads its files when they change)."""

    def __init__(self, app: ASGIApp, operators: Operators) -> None:
        self.app = app
        self.operators = operators

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith(
            PROTECTED_PREFIX
        ):
            await self.app(scope, receive, send)
            return
        presented = bearer_token(scope)
        principal = self.operators.authenticate(presented) if presented is not None else None
        if principal is None:
            detail = (
                "missing bearer token: send 'Authorization: Bearer <operator token>'"
                if presented is None
                else "invalid bearer token"
            )
            await _refuse(scope, receive, send, _unauthorized(detail))
            return
        if principal.expired(_now()):  # per request: no restart when a certificate expires
            assert principal.expires is not None
            detail = (
                f"operator {principal.name!r}'s certificate expired at "
                f"{format_time(principal.expires)}"
            )
            await _refuse(scope, receive, send, _unauthorized(detail))
            return
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        role = required_role(method, scope["path"])
        if not principal.may(role):
            problem = Problem(
                403,
                f"operator {principal.name!r} lacks the {role.value!r} role",
                kind="forbidden",
            )
            await _refuse(scope, receive, send, problem)
            return
        scope = dict(scope)
        scope[TENANT_SCOPE_KEY] = principal.tenant
        scope[PRINCIPAL_SCOPE_KEY] = principal
        await self.app(scope, receive, send)


def _unauthorized(detail: str) -> Problem:
    return Problem(
        401,
        detail,
        kind="unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="margo-stream"'},
    )


async def _refuse(scope: Scope, receive: Receive, send: Send, problem: Problem) -> None:
    if scope["type"] == "websocket":
        reason = "unauthorized" if problem.status == 401 else problem.detail[:120]
        await send({"type": "websocket.close", "code": 1008, "reason": reason})
        return
    await problem_response(problem)(scope, receive, send)
