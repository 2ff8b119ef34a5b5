"""Operator authentication: ``Authorization: Bearer <token>``, one token per tenant.

Tokens live in ``CERTS/<tenant>/operator.token`` (one line). A request is authenticated as the
operator of exactly one tenant, and every route then works inside that tenant only. Tokens are
compared in constant time against every known token (no early exit), so response timing says
nothing about how much of a guess was right or which tenant it was close to.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from controller.api.routes_common import TENANT_SCOPE_KEY, problem_response
from controller.problems import Problem
from margo_stream.errors import ConfigError

TOKEN_FILE = "operator.token"
PROTECTED_PREFIX = "/api/"


def load_operator_tokens(certs_dir: str | Path) -> dict[str, str]:
    """``{token: tenant}`` from ``certs_dir/<tenant>/operator.token``.

    ``ConfigError`` (naming the file) for an unreadable or empty token file, or a token shared
    by two tenants."""
    root = Path(certs_dir)
    tokens: dict[str, str] = {}
    if not root.is_dir():
        raise ConfigError(f"certificate directory {root} does not exist")
    for path in sorted(root.glob(f"*/{TOKEN_FILE}")):
        tenant = path.parent.name
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read operator token {path}: {exc}") from exc
        if not token:
            raise ConfigError(f"operator token file {path} is empty")
        if token in tokens:
            raise ConfigError(
                f"operator token {path} is also the token of tenant {tokens[token]!r}"
            )
        tokens[token] = tenant
    return tokens


def _fingerprint(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def match_token(tokens: Mapping[str, str], presented: str) -> str | None:
    """The tenant whose token is ``presented``, compared in constant time; None if none."""
    probe = _fingerprint(presented)
    found: str | None = None
    for token, tenant in list(tokens.items()):
        if hmac.compare_digest(probe, _fingerprint(token)) and found is None:
            found = tenant
    return found


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
            return None
    return None


class BearerAuthMiddleware:
    """Authenticates every HTTP and WebSocket request under ``/api/`` as one tenant's
    operator and stores the tenant in ``scope["margo.tenant"]``. ``tokens`` is read on every
    request, so the caller may update the mapping in place to rotate tokens."""

    def __init__(self, app: ASGIApp, tokens: Mapping[str, str]) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith(
            PROTECTED_PREFIX
        ):
            await self.app(scope, receive, send)
            return
        presented = bearer_token(scope)
        tenant = match_token(self.tokens, presented) if presented is not None else None
        if tenant is None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
                return
            detail = (
                "missing bearer token: send 'Authorization: Bearer <operator token>'"
                if presented is None
                else "invalid bearer token"
            )
            response = problem_response(
                Problem(
                    401,
                    detail,
                    kind="unauthorized",
                    headers={"WWW-Authenticate": 'Bearer realm="margo-stream"'},
                )
            )
            await response(scope, receive, send)
            return
        scope = dict(scope)
        scope[TENANT_SCOPE_KEY] = tenant
        await self.app(scope, receive, send)
