"""The operator HTTP API (Starlette). The controller serves it with uvicorn inside its own
event loop; tests drive it through ``httpx.ASGITransport``.

Every route under ``/api/v1`` is authenticated as one tenant's operator (``auth.py``) and
answers only about that tenant. Every error, including unknown routes and unexpected
failures, is an RFC 9457 problem details document.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from controller.api import (
    routes_deployments,
    routes_devices,
    routes_events,
    routes_identities,
    routes_logs,
    routes_operators,
    routes_rollouts,
    routes_sessions,
    routes_telemetry,
    routes_terminal,
)
from controller.api.auth import BearerAuthMiddleware
from controller.api.body_limit import DEFAULT_MAX_BODY, BodyLimitMiddleware
from controller.api.openapi import openapi_document
from controller.api.routes_common import ApiContext, problem_response
from controller.api.routes_rollouts import RolloutWaker
from controller.console import routes as console_routes
from controller.document_cache import DocumentCache
from controller.identities import IdentityBook
from controller.ports import DesiredChanges
from controller.problems import Problem
from controller.registry import SessionRegistry
from controller.root_chains import RootChains
from controller.store.base import Store
from controller.terminal import TerminalService
from margo_stream.errors import ConfigError, DocumentError, NotFound, StoreError
from margo_stream.identity.operator_files import Operators
from margo_stream.state.yaml_guard import YamlLimitError

log = logging.getLogger("margo.controller.api")


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.openapi)


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        detail = f"no route {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} not allowed on {request.url.path}"
    else:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.status_code)
    return problem_response(Problem(exc.status_code, detail, headers=exc.headers))


async def _not_found(request: Request, exc: Exception) -> Response:
    return problem_response(Problem(404, str(exc), kind="not-found"))


async def _invalid(request: Request, exc: Exception) -> Response:
    return problem_response(Problem(422, str(exc), kind="invalid-document"))


async def _too_complex(request: Request, exc: Exception) -> Response:
    return problem_response(Problem(422, str(exc), kind="document-too-complex"))


async def _exhausted(request: Request, exc: Exception) -> Response:
    # the input limits should keep these from happening; if one does, it is the request's
    # doing (too deep, too large): one log line and a 4xx, never a traceback flood
    what = type(exc).__name__
    log.warning(
        "%s answering %s %s: refused as too large or too deeply nested",
        what,
        request.method,
        request.url.path,
        extra={"event": "request-exhausted"},
    )
    return problem_response(
        Problem(
            422,
            f"the request is too large or too deeply nested to process ({what})",
            kind="request-too-complex",
        )
    )


async def _bad_request(request: Request, exc: Exception) -> Response:
    return problem_response(Problem(400, str(exc), kind="invalid-request"))


async def _store_error(request: Request, exc: Exception) -> Response:
    log.error("store failure answering %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        Problem(503, f"the controller's store failed: {exc}", kind="store-unavailable")
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception(
        "unexpected error answering %s %s", request.method, request.url.path, exc_info=exc
    )
    return problem_response(
        Problem(500, "internal error; see the controller's log", kind="internal")
    )


def create_app(
    *,
    store: Store,
    registry: SessionRegistry,
    operators: Operators,
    desired: DesiredChanges | None = None,
    terminals: TerminalService | None = None,
    documents: DocumentCache | None = None,
    roots: RootChains | None = None,
    identities: IdentityBook | None = None,
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    rollouts: RolloutWaker | None = None,
) -> Starlette:
    """The operator API over ``store`` and ``registry``.

    ``operators`` says who a bearer token is (tenant, name, roles, expiry) and is consulted on
    every request; the route policy (``policy.py``) says which role each route needs.
    ``desired``, when given, is told about every stored desired-state change;
    ``terminals`` serves terminal sessions; ``documents`` is where parsed deployment documents
    are kept for the desired-state push (a private one when not given); ``identities`` is the
    controller's allow-list (device state, revoke, allow) and ``reload`` re-reads its files.
    ``max_body`` bounds every request body (``--api-max-body``; 413 beyond it);
    ``rollouts`` (the rollout driver) is woken when a rollout is created or commanded."""
    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/api/v1/openapi.json", openapi_json, methods=["GET"]),
        # device sub-resources first: the device route's id may contain '/'
        *routes_deployments.routes(),
        *routes_telemetry.routes(),
        *routes_terminal.routes(),
        *routes_logs.routes(),  # workload logs, read from the device (controller/logs.py)
        *routes_identities.routes(),
        *routes_devices.routes(),
        *routes_events.routes(),
        *routes_sessions.routes(),
        *routes_operators.routes(),
        *routes_rollouts.routes(),
        *console_routes.routes(),  # the web console at /ui/ (and GET /api/v1/me)
    ]
    handlers: dict[Any, Any] = {
        Problem: _problem,
        HTTPException: _http_exception,
        NotFound: _not_found,
        YamlLimitError: _too_complex,
        DocumentError: _invalid,
        RecursionError: _exhausted,
        MemoryError: _exhausted,
        ConfigError: _bad_request,
        ValueError: _bad_request,
        StoreError: _store_error,
        Exception: _unexpected,
    }
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(BodyLimitMiddleware, max_body=max_body),
            Middleware(BearerAuthMiddleware, operators=operators),
        ],
        exception_handlers=handlers,
    )
    app.state.margo = ApiContext(
        store=store,
        registry=registry,
        documents=documents if documents is not None else DocumentCache(),
        desired=desired,
        terminals=terminals,
        roots=roots,
        identities=identities,
        reload=reload,
    )
    doc = openapi_document()
    paths = {**doc["paths"], **routes_rollouts.openapi_paths(), **console_routes.openapi_paths()}
    app.state.openapi = {**doc, "paths": paths}
    app.state.operators = operators
    app.state.rollouts = rollouts
    app.state.openapi["paths"].update(routes_logs.openapi_paths())
    return app
