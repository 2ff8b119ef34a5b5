"""``margoctl logs``: a workload's output, read from the device, like ``kubectl logs``.

    margoctl logs --device ID DEPLOYMENT [COMPONENT] [--tail N] [-f]

Prints the last N lines (default 100) of the component's log (every component's, each line
starting with ``[component] ``, when the deployment has several and none is named). With
``-f`` it goes on printing new lines as the workload writes them, until the component stops
(exit status 0) or Ctrl-C. The controller reads the log from the device over its connection
(``GET /api/v1/devices/{id}/logs/{deployment}[/{component}]``); the role ``viewer`` suffices.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

from margo_stream.api_client import ApiClient, ApiConnectionError
from margo_stream.protocol.messages import LOGS_MAX_TAIL

IDLE_TIMEOUT = 60.0  # seconds without a line or keepalive before a follow gives up


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "logs",
        help="print (or follow) a workload's log from its device",
        parents=[common],
        description="Print the last lines of a deployment component's stdout and stderr, as "
        "the device keeps them; -f follows new lines.",
    )
    p.add_argument("--device", required=True, metavar="ID", help="the device running it")
    p.add_argument("deployment", metavar="DEPLOYMENT")
    p.add_argument("component", nargs="?", metavar="COMPONENT", help="default: every component")
    p.add_argument(
        "--tail",
        type=_tail,
        default=100,
        metavar="N",
        help=f"lines of the log to show first (default 100, at most {LOGS_MAX_TAIL})",
    )
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")


def _tail(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tail takes a number, not {text!r}") from None
    if not 0 <= value <= LOGS_MAX_TAIL:
        raise argparse.ArgumentTypeError(f"--tail must be 0..{LOGS_MAX_TAIL}, not {value}")
    return value


def logs_path(device: str, deployment: str, component: str | None) -> str:
    path = f"/api/v1/devices/{quote(device, safe='/')}/logs/{quote(deployment, safe='')}"
    return path + (f"/{quote(component, safe='')}" if component else "")


def sse_lines(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """``(event, data)`` of each Server-Sent Event in ``lines`` (comments skipped)."""
    event, data = "message", list[str]()
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()


def cmd_logs(client: ApiClient, args: argparse.Namespace) -> None:
    path = logs_path(args.device, args.deployment, args.component)
    params: dict[str, Any] = {"tail": args.tail}
    if args.follow:
        params["follow"] = 1
    read = IDLE_TIMEOUT if args.follow else client._timeout
    timeout = httpx.Timeout(client._timeout, read=read)
    headers = {"Accept": "text/event-stream" if args.follow else "text/plain"}
    out = sys.stdout
    try:
        with client._http.stream(
            "GET", path, params=params, timeout=timeout, headers=headers
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                client._raise_for("GET", resp)
            if not args.follow:
                for text in resp.iter_text():
                    out.write(text)
                out.flush()
                return
            for event, data in sse_lines(resp.iter_lines()):
                if event == "end":
                    break
                out.write(data + "\n")
                out.flush()
    except httpx.TimeoutException:
        raise ApiConnectionError(
            f"GET {client.base_url}{path}: no answer for {read:g}s", url=client.base_url + path
        ) from None
    except httpx.HTTPError as exc:
        raise ApiConnectionError(
            f"cannot reach {client.base_url}{path}: {exc or type(exc).__name__}",
            url=client.base_url + path,
        ) from None
