"""``margoctl terminal`` and ``margoctl exec``: sessions on a device through the controller.

    margoctl terminal DEVICE [-- CMD ...]   a shell (or CMD) on a PTY of the device
    margoctl exec DEVICE -- CMD ...         run CMD without a terminal

``terminal`` is interactive when stdin is a terminal: the local terminal goes into raw mode
(every key, Ctrl-C included, goes to the remote side; the remote PTY echoes), window-size
changes are forwarded, and the local terminal is restored on every exit, errors included.
``exec`` forwards stdin (and its end), writes the command's stdout and stderr to ours, and
exits with the command's exit status (128+N when a signal N killed it).

Exit status 255 means the session could not run or was cut short (no such device, refused
by the device, controller shutting down, connection lost); a one-line message says why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import ssl
import stat
import sys
from dataclasses import dataclass
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from margo_stream.cli.tty import get_winsize, raw_mode, winsize_changes
from margo_stream.identity.authored import make_grant
from margo_stream.identity.operator_files import OperatorCredentials

PROG = "margoctl"
SESSION_FAILED = 255
READ_CHUNK = 64 * 1024
IN_DATA, OUT_STDOUT, OUT_STDERR = 0, 1, 2


class SessionError(Exception):
    """The session could not run or ended without an exit status; the message says why."""


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "terminal",
        parents=[common],
        help="open a shell (or run CMD) on a device's terminal",
        description="Open an interactive terminal on DEVICE: its login shell, or CMD after '--'.",
    )
    p.add_argument("device", metavar="DEVICE")
    p.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- CMD",
        help="command and arguments (default: the device's login shell)",
    )
    p = commands.add_parser(
        "exec",
        parents=[common],
        help="run a command on a device",
        description="Run CMD on DEVICE without a terminal: stdin is "
        "forwarded, stdout and stderr come back, and the exit "
        "status is the command's.",
    )
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD")


class HeldElsewhere(SessionError):
    """Another controller of the cluster holds the device; ``api`` is its operator API."""

    def __init__(self, api: str, reason: str) -> None:
        super().__init__(reason)
        self.api = api
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # ws:// or wss:// URL of the device's terminal route
    token: str
    ssl: ssl.SSLContext | None
    open_timeout: float
    device: str = ""
    creds: OperatorCredentials | None = None  # signs the session's grant

    def grant(self, command: list[str] | None, tty: bool) -> dict[str, Any]:
        """The open message's grant and certificate: signed here, on the operator's machine,
        for this device and command only, valid a minute and once."""
        creds = self.creds
        if creds is None or creds.key is None or creds.certificate is None or not creds.name:
            raise SessionError(
                "terminals open only on a grant signed with the operator's key: use --operator "
                "DIR, or a token file with operator.key and operator.cert.json beside it"
            )
        grant = make_grant(
            creds.tenant or "",
            self.device,
            command,
            tty=tty,
            operator=creds.name,
            key=creds.key,
            now=dt.datetime.now(dt.UTC),
        )
        return {"grant": grant, "certificate": creds.certificate}


def make_target(
    base_url: str,
    token: str,
    device: str,
    verify: bool | str,
    timeout: float,
    creds: OperatorCredentials | None = None,
) -> Target:
    from urllib.parse import quote

    scheme, sep, rest = base_url.partition("://")
    ws_scheme = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme) if sep else "ws"
    url = f"{ws_scheme}://{rest if sep else base_url}/api/v1/devices/{quote(device, safe='/')}/terminal"
    context = None
    if ws_scheme == "wss":
        context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    return Target(
        url=url, token=token, ssl=context, open_timeout=timeout, device=device, creds=creds
    )


def exit_code(status: int) -> int:
    return status if status >= 0 else 128 + (-status)


# --- stdin -----------------------------------------------------------------------------------
def _pollable(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return os.isatty(fd) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def _read_input(fd: int, pollable: bool) -> bytes:
    """Up to ``READ_CHUNK`` bytes of ``fd``; ``b""`` at its end. Regular files and
    /dev/null cannot be polled but never block for long, so they are read directly."""
    if pollable:
        await anyio.wait_readable(fd)
    try:
        return os.read(fd, READ_CHUNK)
    except OSError:
        return b""


# --- the session ---------------------------------------------------------------------------------
async def _open(
    target: Target, command: list[str] | None, rows: int, cols: int, tty: bool
) -> tuple[ClientConnection, dict[str, Any]]:
    try:
        ws = await connect(
            target.url,
            additional_headers={"Authorization": f"Bearer {target.token}"},
            ssl=target.ssl,
            open_timeout=target.open_timeout,
            compression=None,
            proxy=None,
            max_size=4 << 20,
            ping_interval=20,
            ping_timeout=30,
            close_timeout=2,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise SessionError("the controller refused the operator token") from None
        raise SessionError(f"the controller answered {status} to {target.url}") from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise SessionError(f"cannot reach {target.url}: {exc}") from None
    try:
        opening = {"type": "open", "command": command, "rows": rows, "cols": cols, "tty": tty}
        await ws.send(json.dumps({**opening, **target.grant(command, tty)}))
        reply = json.loads(await ws.recv())
    except ConnectionClosed as exc:
        raise SessionError(
            f"the controller closed the session: {exc.rcvd.reason if exc.rcvd else exc}"
        ) from None
    if reply.get("type") != "opened":
        await ws.close()
        if reply.get("code") == "elsewhere" and isinstance(reply.get("api"), str):
            raise HeldElsewhere(reply["api"], reply.get("reason") or "")
        raise SessionError(reply.get("reason") or f"unexpected answer {reply!r}")
    return ws, reply


async def run_session(target: Target, command: list[str] | None, *, tty: bool) -> int:
    """Run one session with this process's stdio; returns margoctl's exit status."""
    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = tty and os.isatty(in_fd)
    rows, cols = get_winsize(in_fd if interactive else out_fd)
    ws, _opened = await _open(target, command, rows, cols, tty)
    async with ws:
        if interactive:
            with raw_mode(in_fd), winsize_changes(in_fd) as sizes:
                return await _relay(ws, in_fd, sizes)
        return await _relay(ws, in_fd, None)


async def _relay(ws: ClientConnection, in_fd: int, sizes: Any) -> int:
    result: dict[str, Any] = {}
    outputs = {OUT_STDOUT: sys.stdout.buffer, OUT_STDERR: sys.stderr.buffer}

    async def forward_input() -> None:
        pollable = _pollable(in_fd)
        while True:
            data = await _read_input(in_fd, pollable)
            if not data:
                await ws.send(json.dumps({"type": "eof"}))
                return
            await ws.send(bytes((IN_DATA,)) + data)

    async def forward_sizes() -> None:
        async for rows, cols in sizes:
            await ws.send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    async def receive() -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    out = outputs.get(message[0])
                    if out is not None:
                        out.write(message[1:])
                        out.flush()
                    continue
                body = json.loads(message)
                if body.get("type") in ("exit", "error"):
                    result.update(body)
                    return
        except ConnectionClosed:
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(_quietly, forward_input)
        if sizes is not None:
            tg.start_soon(_quietly, forward_sizes)
        await receive()
        tg.cancel_scope.cancel()
    if result.get("type") == "exit":
        return exit_code(int(result.get("status", 0)))
    if result.get("type") == "error":
        raise SessionError(result.get("reason") or "the session failed")
    raise SessionError("lost the connection to the controller")


async def _quietly(fn: Any) -> None:
    try:
        await fn()
    except ConnectionClosed:
        pass


def main(
    base_url: str,
    token: str,
    verify: bool | str,
    timeout: float,
    args: argparse.Namespace,
    creds: OperatorCredentials | None = None,
) -> int:
    command = list(args.argv or []) or None
    if args.command == "exec" and command is None:
        sys.stderr.write(f"{PROG}: error: exec needs a command: margoctl exec DEVICE -- CMD ...\n")
        return 2
    target = make_target(base_url, token, args.device, verify, timeout, creds)
    run = functools.partial(run_session, command=command, tty=args.command == "terminal")
    try:
        try:
            return anyio.run(run, target)
        except HeldElsewhere as exc:
            # another controller of the cluster holds the device: once, through its API
            sys.stderr.write(f"{PROG}: {exc.reason}; connecting there\n")
            elsewhere = make_target(exc.api, token, args.device, verify, timeout, creds)
            return anyio.run(run, elsewhere)
    except SessionError as exc:
        sys.stderr.write(f"{PROG}: error: {args.command} on {args.device}: {exc}\n")
        return SESSION_FAILED
    except BrokenPipeError:
        return 0
