"""The console's routes: ``/`` and ``/ui`` redirect to ``/ui/``, which serves the page;
``/ui/static/{name}`` its files; ``GET /api/v1/me`` the signed-in operator.

Theory of operation. The page is a static shell: it holds no data and needs no credential,
so the ``/ui/`` routes are public (the auth middleware guards ``/api/`` only). Its scripts ask
the operator API for everything, sending ``Authorization: Bearer <operator token>`` on every
request, so the tenant scoping and the route policy (``controller.api.policy``) apply to the
console as they do to ``margoctl``; ``/api/v1/me`` tells the page which actions that policy
allows its operator, only to decide what to show (the API refuses the rest anyway).

Sign-in keeps the token in the tab's ``sessionStorage``, not in a cookie. A cookie would need
the API to accept a second, ambient credential, which every cross-site request carries: every
state-changing route would then need CSRF defences. A header the page adds itself is never sent
by a browser on another site's behalf, so cross-site request forgery has nothing to ride on,
and the API keeps one authentication path. The price, a token readable by script in this
origin, is bounded by a Content-Security-Policy that allows only this origin's script files (no
inline script, no ``eval``, no other origin to send anything to), by rendering every value
from the API as text (never as HTML), and by ``sessionStorage`` itself: one tab, gone when it
closes or on sign-out.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from controller.api.auth import principal_of
from controller.api.policy import required_role
from controller.problems import Problem
from margo_stream.identity.authority import format_time

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = "index.html"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*\.(html|css|js|svg)$")
_TYPES = {
    "html": "text/html; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidated each load (ETag): a new controller, new files
}

# what the page may offer, by the API route that would do it (the API decides, not the page)
ACTIONS = {
    "apply": ("POST", "/api/v1/deployments"),
    "remove": ("DELETE", "/api/v1/devices/d/deployments/x"),
    "rollout": ("POST", "/api/v1/rollouts/x/pause"),
    "label": ("PATCH", "/api/v1/devices/d/labels"),
    "terminal": ("GET", "/api/v1/devices/d/terminal"),
    "logs": ("GET", "/api/v1/devices/d/logs/x"),
    "admin": ("POST", "/api/v1/admin/reload"),
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets(directory: Path = STATIC_DIR) -> dict[str, Asset]:
    """The console's files, read once: every file directly in ``directory`` whose name is a
    plain lowercase name with a known suffix (nothing else is ever served)."""
    assets: dict[str, Asset] = {}
    for path in sorted(directory.iterdir()):
        match = _NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets[path.name] = Asset(body, _TYPES[match.group(1)], etag)
    if INDEX not in assets:
        raise FileNotFoundError(f"the console's {INDEX} is missing from {directory}")
    return assets


class Console:
    """Serves the files of ``load_assets`` with the console's security headers."""

    def __init__(self, assets: dict[str, Asset] | None = None) -> None:
        self.assets = assets if assets is not None else load_assets()

    def _serve(self, request: Request, name: str) -> Response:
        asset = self.assets.get(name)
        if asset is None:
            raise Problem(404, f"no console file {name[:80]!r}", kind="not-found")
        headers = {**SECURITY_HEADERS, "ETag": asset.etag}
        if asset.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    async def index(self, request: Request) -> Response:
        return self._serve(request, INDEX)

    async def static(self, request: Request) -> Response:
        return self._serve(request, str(request.path_params["name"]))


async def to_console(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=307)


async def me(request: Request) -> JSONResponse:
    """The operator the bearer token authenticates, and which console actions the route policy
    allows them."""
    principal = principal_of(request.scope)
    if principal is None:  # the auth middleware guards every /api/ path; a second lock
        raise Problem(401, "missing or invalid bearer token", kind="unauthorized")
    return JSONResponse(
        {
            "tenant": principal.tenant,
            "name": principal.name,
            "roles": sorted(r.value for r in principal.roles),
            "expires": None if principal.expires is None else format_time(principal.expires),
            "may": {
                action: principal.may(required_role(method, path))
                for action, (method, path) in ACTIONS.items()
            },
        }
    )


def routes(console: Console | None = None) -> list[Route]:
    """The console's routes (``GET /api/v1/me`` among them: the policy gives it ``viewer``)."""
    served = console if console is not None else Console()
    return [
        Route("/", to_console, methods=["GET"]),
        Route("/ui", to_console, methods=["GET"]),
        Route("/ui/", served.index, methods=["GET"]),
        Route("/ui/static/{name}", served.static, methods=["GET"]),
        Route("/api/v1/me", me, methods=["GET"]),
    ]


def _html(summary: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": [],
            "responses": {"200": {"description": "OK", "content": {"text/html": {}}}},
        }
    }


def openapi_paths() -> dict[str, Any]:
    """The console's routes in the operator API's OpenAPI document (``create_app`` adds them)."""
    redirect = {
        "get": {
            "summary": "Redirects to the web console, /ui/",
            "security": [],
            "responses": {"307": {"description": "to /ui/"}},
        }
    }
    return {
        "/": redirect,
        "/ui": redirect,
        "/ui/": _html("The web console (sign in with an operator token)"),
        "/ui/static/{name}": {
            "get": {
                "summary": "The console's scripts and style sheet",
                "security": [],
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "the file"},
                    "304": {"description": "not modified (ETag)"},
                    "404": {"$ref": "#/components/responses/Problem"},
                },
            }
        },
        "/api/v1/me": {
            "get": {
                "summary": "The signed-in operator: tenant, name, roles, certificate expiry, and "
                "which console actions the route policy allows (may.apply, may.rollout, ...)",
                "responses": {
                    "200": {"description": "the operator", "content": {"application/json": {}}},
                    "401": {"$ref": "#/components/responses/Problem"},
                },
            }
        },
    }
