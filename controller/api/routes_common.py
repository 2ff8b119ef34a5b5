"""What every route module shares: problem responses (RFC 9457, ``controller.problems``), the
request's tenant, the app's collaborators, and parsing/formatting of times and query
parameters."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from controller.document_cache import DocumentCache
from controller.identities import IdentityBook
from controller.ports import DesiredChanges
from controller.problems import OPERATOR_PROBLEMS, PROBLEM_MEDIA_TYPE, Problem
from controller.registry import SessionRegistry
from controller.root_chains import RootChains
from controller.store.base import Store
from controller.terminal import TerminalService

TENANT_SCOPE_KEY = "margo.tenant"
WORKER_THREADS = 2  # CPU-heavy request work (YAML, large JSON) in threads at once, per API
JSON_ON_LOOP_MAX = 64 << 10  # a JSON body larger than this is decoded in a worker thread


def problem_response(problem: Problem) -> Response:
    """The operator API's answer with ``problem`` (``urn:margo-stream:problem:`` types)."""
    return Response(
        problem.body(OPERATOR_PROBLEMS),
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


@dataclass(slots=True)
class ApiContext:
    """What the routes work with, built once at start-up (``create_app``)."""

    store: Store
    registry: SessionRegistry
    documents: DocumentCache
    desired: DesiredChanges | None = None  # told of every stored change, when pushing is served
    terminals: TerminalService | None = None  # when terminal sessions are served
    # the tenants' root metadata, to check operators' signatures on apply; without it (an API
    # over a bare store, in tests) documents are stored as signed, or not, and the devices,
    # which check against the root they pinned, refuse what no operator signed
    roots: RootChains | None = None
    # the allow-list (device state, revoke, allow); None for an API over a bare store
    identities: IdentityBook | None = None
    # re-read bundles, operators and allow files (POST /admin/reload); ConfigError: why not
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None
    _workers: anyio.CapacityLimiter | None = field(default=None, init=False)

    def workers(self) -> anyio.CapacityLimiter:
        """The worker threads CPU-heavy request work runs in (made in the serving loop)."""
        if self._workers is None:
            self._workers = anyio.CapacityLimiter(WORKER_THREADS)
        return self._workers


def context(conn: HTTPConnection) -> ApiContext:
    ctx = conn.app.state.margo
    assert isinstance(ctx, ApiContext)
    return ctx


def tenant_of(request: Request) -> str:
    tenant = request.scope.get(TENANT_SCOPE_KEY)
    if not tenant:  # the auth middleware guards every /api/ path; this is a second lock
        raise Problem(401, "missing or invalid bearer token", kind="unauthorized")
    return tenant


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_time(text: str, *, name: str, now: float | None = None) -> float:
    """A point in time given as RFC 3339, unix seconds, or an age such as ``5m`` / ``2h``."""
    value = text.strip()
    match = _DURATION.match(value)
    if match:
        base = time.time() if now is None else now
        return base - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(number):
            return number
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Problem(
            400,
            f"invalid {name} {text!r}: expected RFC 3339, unix seconds or an age like 5m",
            kind="invalid-parameter",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def int_param(
    request: Request,
    name: str,
    default: int | None,
    *,
    minimum: int = 0,
    maximum: int | None = None,
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Problem(
            400,
            f"query parameter {name!r} must be an integer, got {raw!r}",
            kind="invalid-parameter",
        ) from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        raise Problem(
            400,
            f"query parameter {name!r} must be at least {minimum}{upper}, got {value}",
            kind="invalid-parameter",
        )
    return value


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise Problem(400, "request body is not valid JSON", kind="invalid-body") from None


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; a large body is decoded in a worker thread."""
    raw = await request.body()
    if len(raw) > JSON_ON_LOOP_MAX:
        body = await anyio.to_thread.run_sync(_decode_json, raw, limiter=context(request).workers())
    else:
        body = _decode_json(raw)
    if not isinstance(body, dict):
        raise Problem(400, "request body must be a JSON object", kind="invalid-body")
    return body
