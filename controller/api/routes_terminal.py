"""``/api/v1/devices/{id}/terminal``: a terminal session on a device, over a WebSocket.

Framing (one WebSocket message each):

* binary, operator -> controller: ``0x00`` + bytes for the command's input;
* binary, controller -> operator: ``0x01`` + stdout bytes, ``0x02`` + stderr bytes (a
  terminal session sends everything on 1; ``exec`` without a terminal uses both);
* text (JSON), operator -> controller: first ``{"type": "open", "command": [..] | null,
  "rows": R, "cols": C, "tty": true|false}``, then any of ``{"type": "resize", "rows": R,
  "cols": C}``, ``{"type": "eof"}``, ``{"type": "close"}``;
* text (JSON), controller -> operator: ``{"type": "opened", "session": ID, "pid": PID}``,
  then at the end ``{"type": "exit", "status": N, "reason": ..}`` (close code 1000) or
  ``{"type": "error", "code": KIND, "reason": ..}`` (close code 4400 bad request, 4404 no
  such device or not connected, 4403 refused by the device, 4408 no answer, 1012 controller
  shutting down, 1011 anything else).

Authentication is the bearer token of the HTTP upgrade (the middleware closes an
unauthenticated socket with 1008); the device is looked up in that token's tenant only.
A plain HTTP GET on the path answers 426 Upgrade Required.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import HTTPConnection
from starlette.routing import Match, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from controller.api.auth import principal_of
from controller.api.routes_common import TENANT_SCOPE_KEY, context, problem_response
from controller.problems import Problem
from controller.terminal import (
    SHUTDOWN_REASON,
    OperatorInput,
    OpKind,
    TerminalUnavailable,
)
from margo_stream.identity.envelope import MAX_ENVELOPE_BYTES, canonical

log = logging.getLogger("margo.controller.api.terminal")

IN_DATA, OUT_STDOUT, OUT_STDERR = 0, 1, 2
OPEN_TIMEOUT = 10.0
CLOSE_CODES = {
    "bad-request": 4400,
    "not-found": 4404,
    "not-connected": 4404,
    "refused": 4403,
    "timeout": 4408,
    "shutting-down": 1012,
    "elsewhere": 4307,  # another controller of the cluster holds the device: "api" says which
}


class BadRequest(Exception):
    pass


def _size(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1000:
        raise BadRequest(f"{name!r} must be an integer 1..1000")
    return value


@dataclass(frozen=True, slots=True)
class OpenRequest:
    command: list[str] | None
    rows: int
    cols: int
    tty: bool
    grant: bytes | None  # the operator's signed grant, canonical JSON, relayed to the device
    certificate: bytes | None  # the operator's certificate, likewise


def _envelope(body: dict[str, Any], name: str) -> bytes | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"{name!r} must be a signed envelope (a JSON object)")
    data = canonical(value)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise BadRequest(f"{name!r} is larger than {MAX_ENVELOPE_BYTES} bytes")
    return data


def parse_open(text: str) -> OpenRequest:
    try:
        body = json.loads(text)
    except ValueError:
        raise BadRequest("the first message must be a JSON object") from None
    if not isinstance(body, dict) or body.get("type") != "open":
        raise BadRequest('the first message must be {"type": "open", ...}')
    command = body.get("command")
    if command is not None and (
        not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command)
    ):
        raise BadRequest("'command' must be a non-empty list of strings, or null")
    tty = body.get("tty", True)
    if not isinstance(tty, bool):
        raise BadRequest("'tty' must be true or false")
    return OpenRequest(
        command,
        _size(body, "rows", 24),
        _size(body, "cols", 80),
        tty,
        _envelope(body, "grant"),
        _envelope(body, "certificate"),
    )


class WebSocketOperator:
    """The operator's end of the bridge, speaking the framing above."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.gone = False

    async def receive(self) -> OperatorInput | None:
        while not self.gone:
            try:
                msg = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                msg = {"type": "websocket.disconnect"}
            if msg["type"] == "websocket.disconnect":
                self.gone = True
                return None
            data = msg.get("bytes")
            if data is not None:
                if len(data) > 1 and data[0] == IN_DATA:
                    return OperatorInput(OpKind.DATA, data=data[1:])
                continue
            try:
                body = json.loads(msg.get("text") or "")
                kind = body.get("type")
                if kind == "resize":
                    return OperatorInput(
                        OpKind.RESIZE, rows=_size(body, "rows", 0), cols=_size(body, "cols", 0)
                    )
                if kind == "eof":
                    return OperatorInput(OpKind.EOF)
                if kind == "close":
                    return OperatorInput(OpKind.CLOSE)
            except (ValueError, AttributeError, BadRequest) as exc:
                log.debug("ignored an operator message: %s", exc)
        return None

    async def send_output(self, fd: int, data: bytes) -> None:
        if self.gone:
            return
        try:
            await self.ws.send_bytes(bytes((fd,)) + data)
        except Exception:  # noqa: BLE001 - the operator went away; the bridge carries on
            self.gone = True

    async def send_json(self, body: dict[str, Any]) -> None:
        if not self.gone:
            try:
                await self.ws.send_text(json.dumps(body))
            except Exception:  # noqa: BLE001
                self.gone = True

    async def close(self, code: int, reason: str = "") -> None:
        if not self.gone:
            self.gone = True
            try:
                await self.ws.close(code, reason[:120])
            except Exception:  # noqa: BLE001
                pass


async def terminal(ws: WebSocket) -> None:
    tenant = ws.scope.get(TENANT_SCOPE_KEY)
    if not tenant:  # the auth middleware already closed it; a second lock
        await ws.close(1008, "unauthorized")
        return
    device_id = ws.path_params["device_id"]
    op = WebSocketOperator(ws)
    await ws.accept()

    async def fail(kind: str, reason: str, api: str | None = None) -> None:
        await op.send_json(
            {"type": "error", "code": kind, "reason": reason, **({"api": api} if api else {})}
        )
        await op.close(CLOSE_CODES.get(kind, 1011), reason)

    try:
        with anyio.fail_after(OPEN_TIMEOUT):
            first = await ws.receive()
        if first["type"] == "websocket.disconnect":
            return
        req = parse_open(first.get("text") or "")
    except TimeoutError:
        await fail("bad-request", f"no open message within {OPEN_TIMEOUT:g} s")
        return
    except BadRequest as exc:
        await fail("bad-request", str(exc))
        return
    service = context(ws).terminals
    if service is None:
        await fail("unavailable", "terminal sessions are not served by this controller")
        return
    principal = principal_of(ws.scope)
    operator = principal.name if principal is not None else "unknown"
    try:
        term = await service.open(
            tenant,
            device_id,
            operator=operator,
            command=req.command,
            rows=req.rows,
            cols=req.cols,
            tty=req.tty,
            grant=req.grant,
            certificate=req.certificate,
        )
    except TerminalUnavailable as exc:
        kind = "shutting-down" if exc.reason == SHUTDOWN_REASON else exc.kind
        await fail(kind, exc.reason, exc.api)
        return
    await op.send_json({"type": "opened", "session": term.audit_id, "pid": term.pid})
    outcome = await term.bridge(op)
    if outcome.error is not None:
        await fail("shutting-down" if outcome.error == SHUTDOWN_REASON else "ended", outcome.error)
    else:
        await op.send_json({"type": "exit", "status": outcome.status, "reason": outcome.reason})
        await op.close(1000)


class TerminalRoute(WebSocketRoute):
    """The WebSocket route, which also answers a plain HTTP GET with 426 (the WebSocket
    handshake is an HTTP GET, which is how the OpenAPI document describes it)."""

    methods = {"GET"}

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            match, child = super().matches({**scope, "type": "websocket"})
            return match, child
        return super().matches(scope)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if HTTPConnection(scope).scope.get("method", "GET") not in ("GET", "HEAD"):
                response = problem_response(
                    Problem(405, f"method {scope['method']} not allowed on {scope['path']}")
                )
            else:
                response = problem_response(
                    Problem(
                        426,
                        "this route speaks WebSocket: connect with an Upgrade: websocket GET",
                        kind="upgrade-required",
                        headers={"Upgrade": "websocket"},
                    )
                )
            await response(scope, receive, send)
            return
        await super().handle(scope, receive, send)


def routes() -> list[WebSocketRoute]:
    return [TerminalRoute("/api/v1/devices/{device_id:path}/terminal", terminal)]
