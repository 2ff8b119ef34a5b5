"""A limit on operator request bodies (``--api-max-body``), enforced before they are read.

A pure ASGI middleware in front of the operator API:

- a request that declares a ``Content-Length`` above the limit is answered at once with a 413
  problem (``urn:margo-stream:problem:body-too-large``), before a byte of its body is read;
- a body without a declared length (chunked) is counted as the application reads it: the read
  that passes the limit raises :class:`BodyTooLarge`, a ``Problem`` the API answers with the
  same 413.

Either answer carries ``Connection: close``, and nothing of the body is kept. Theory of the
close: a client that writes its whole body before it reads the answer (httpx, both flavours;
the asyncio one drops what it received once a write fails) must not find the connection reset
under its feet, so the rest of a body that could still end soon is read and dropped first (a
"lingering close": at most another ``max_body`` bytes, for at most :data:`LINGER_SECONDS`);
a body past that is cut off by the close. For a declared length the answer's status, headers
and body go out at once and only its end waits for the lingering, so a client reading early
has the whole 413 at once. WebSocket requests (terminals) pass untouched.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.api.routes_common import problem_response
from controller.problems import OPERATOR_PROBLEMS, Problem

DEFAULT_MAX_BODY = 8 << 20
LINGER_SECONDS = 2.0  # how long the rest of a refused body is read and dropped, at most


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


class BodyTooLarge(Problem):
    """A request body past the API's limit (413)."""

    def __init__(self, limit: int, seen: int | None = None) -> None:
        got = f"declares {seen} bytes" if seen is not None else "is longer"
        super().__init__(
            413,
            f"the request body {got}; the limit is {_size(limit)} ({limit} bytes, the "
            "controller's --api-max-body)",
            kind="body-too-large",
            headers={"Connection": "close"},
        )


def declared_length(scope: Scope) -> int | None:
    """The request's ``Content-Length``, or None if it declares none (or a malformed one,
    which the HTTP server has refused already)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def linger(receive: Receive, budget: int, seconds: float = LINGER_SECONDS) -> bool:
    """Read and drop at most ``budget`` more bytes of the request body, for at most
    ``seconds``; True if the body (or the connection) ended."""
    with anyio.move_on_after(seconds):
        while budget >= 0:
            message = await receive()
            if message["type"] != "http.request":
                return True
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
    return False


class BodyLimitMiddleware:
    """Refuses HTTP request bodies longer than ``max_body`` bytes with a 413 problem."""

    def __init__(self, app: ASGIApp, max_body: int = DEFAULT_MAX_BODY) -> None:
        if max_body < 0:
            raise ValueError("max_body must be at least 0")
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_body:
            await self._refuse_declared(declared, receive, send)
            return
        limit = self.max_body
        read = 0

        async def limited_receive() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    if message.get("more_body", False):
                        await linger(receive, limit)
                    raise BodyTooLarge(limit)
            return message

        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge as exc:  # raised past the API's own problem handler
            if started:
                raise
            await problem_response(exc)(scope, receive, send)

    async def _refuse_declared(self, declared: int, receive: Receive, send: Send) -> None:
        problem = BodyTooLarge(self.max_body, declared)
        body = problem.body(OPERATOR_PROBLEMS)
        rendered = problem.render(OPERATOR_PROBLEMS)
        headers = [(k.lower().encode(), v.encode()) for k, v in rendered.headers]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        if declared - self.max_body > self.max_body:  # too much to wait for: close at once
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await linger(receive, declared)
        await send({"type": "http.response.body", "body": b""})


__all__ = [
    "DEFAULT_MAX_BODY",
    "LINGER_SECONDS",
    "BodyLimitMiddleware",
    "BodyTooLarge",
    "declared_length",
    "linger",
]
