"""The operator API's one route policy table: which role each route needs.

The auth middleware (``auth.py``) looks up every authenticated request here before routing:
the first entry whose method and path template match names the role required. A route not
listed needs ``admin`` (so a new route is closed until someone decides who may use it), and
``admin`` holds every role (``Principal.may``). The terminal WebSocket's handshake is a GET.
A unit test checks that every route of the app has an entry.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from starlette.routing import compile_path

from margo_stream.identity.authority import Role

V1 = "/api/v1"
DEVICE = V1 + "/devices/{device_id:path}"

# (method, path template, role), most specific first: the first match decides.
POLICY: Sequence[tuple[str, str, Role]] = (
    ("GET", V1 + "/openapi.json", Role.VIEWER),
    ("GET", V1 + "/operators", Role.VIEWER),
    ("GET", V1 + "/me", Role.VIEWER),  # the web console's operator (controller/console)
    ("GET", V1 + "/deployments", Role.VIEWER),
    ("POST", V1 + "/deployments", Role.DEPLOYER),
    ("DELETE", DEVICE + "/deployments/{deployment_id}", Role.DEPLOYER),
    ("GET", DEVICE + "/telemetry", Role.VIEWER),
    ("GET", DEVICE + "/terminal", Role.TERMINAL),
    ("GET", DEVICE + "/logs/{deployment_id}", Role.VIEWER),  # routes_logs: workload logs
    ("GET", DEVICE + "/logs/{deployment_id}/{component}", Role.VIEWER),  # routes_logs
    ("PATCH", DEVICE + "/labels", Role.DEPLOYER),
    ("POST", DEVICE + "/revoke", Role.ADMIN),
    ("POST", DEVICE + "/allow", Role.ADMIN),
    ("GET", V1 + "/devices", Role.VIEWER),
    ("GET", DEVICE, Role.VIEWER),
    ("GET", V1 + "/events", Role.VIEWER),
    ("GET", V1 + "/events/stream", Role.VIEWER),
    ("GET", V1 + "/sessions", Role.VIEWER),
    ("GET", V1 + "/rollouts", Role.VIEWER),
    ("GET", V1 + "/rollouts/{name}", Role.VIEWER),
    ("POST", V1 + "/rollouts", Role.DEPLOYER),
    ("POST", V1 + "/rollouts/{name}/{command}", Role.DEPLOYER),
    ("POST", V1 + "/admin/reload", Role.ADMIN),
)
DEFAULT_ROLE = Role.ADMIN

_COMPILED: list[tuple[str, re.Pattern[str], Role]] = [
    (method, compile_path(template)[0], role) for method, template, role in POLICY
]


def required_role(method: str, path: str) -> Role:
    """The role a request needs (HEAD is a GET; a WebSocket handshake is a GET)."""
    method = "GET" if method in ("HEAD", "WEBSOCKET") else method.upper()
    for entry_method, pattern, role in _COMPILED:
        if entry_method == method and pattern.match(path):
            return role
    return DEFAULT_ROLE
