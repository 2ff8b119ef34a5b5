"""``margo-agent``: the device daemon (and ``margo-agent emit`` for producers)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from pydantic import ValidationError

from agent.config import AgentConfig
from agent.controller_list import ControllerEntry, parse_controllers
from margo_stream.cli.common import fail, run_service
from margo_stream.errors import ConfigError, MargoError
from margo_stream.logs import setup_logging
from margo_stream.transport.congestion import CONGESTION_CONTROLS, DEFAULT_CONGESTION_CONTROL
from margo_stream.transport.proxy import parse_proxy_url
from margo_stream.transport.quic_client import parse_host_port
from margo_stream.transport.quic_stack import DEFAULT_QUIC_STACK, QUIC_STACKS

PROG = "margo-agent"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?")
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str, *, what: str) -> float:
    """Seconds in ``20``, ``20s``, ``500ms``, ``5m`` or ``1h``; ``ConfigError`` otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ConfigError(f"{what} {text!r} is not a duration (examples: 20, 20s, 5m, 1h)")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{what} {text!r} must be more than zero")
    return seconds


def _labels(values: list[str]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run the margo-stream device agent.")
    p.add_argument(
        "--identity",
        required=True,
        type=Path,
        help="device identity directory made by margo-certs device",
    )
    p.add_argument(
        "--controller",
        required=True,
        help="controller QUIC HOST:PORT, or several as HOST:PORT,HOST:PORT,... (a host name "
        "may resolve to several addresses): tried in an order shuffled for this agent; a lost "
        "connection moves to the next one at once",
    )
    p.add_argument(
        "--tcp-controller",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="where the TCP carrier (TLS over TCP, HTTP/2) goes when QUIC gets no handshake: "
        "one HOST:PORT for every --controller entry, or one per entry in the same order "
        "(default: each --controller entry's own host and port)",
    )
    p.add_argument(
        "--quic-timeout",
        default="5",
        metavar="SECONDS",
        help="no QUIC handshake within this time: connect over TCP instead (default 5 s)",
    )
    p.add_argument(
        "--quic-retry",
        default="300",
        metavar="DURATION",
        help="while on TCP, probe QUIC this often and move back when it works (seconds, or "
        "with a unit: 20s, 5m; default 5m)",
    )
    p.add_argument(
        "--proxy",
        metavar="http://[USER:PASS@]HOST:PORT",
        help="HTTP proxy (CONNECT) for the TCP carrier; wins over HTTPS_PROXY/https_proxy, "
        "which are used otherwise, with NO_PROXY/no_proxy",
    )
    # fixes the shuffle of --controller instead of fresh randomness (tests)
    p.add_argument("--controller-order-seed", help=argparse.SUPPRESS)
    p.add_argument(
        "--server-name",
        help="controller TLS name (default: the device's tenant, which chooses the "
        "certificate the controller presents)",
    )
    p.add_argument("--state", required=True, type=Path, help="agent state directory")
    p.add_argument("--label", action="append", default=[], help="device label KEY=VALUE")
    p.add_argument("--keepalive", type=float, help="keepalive seconds (default: controller's)")
    p.add_argument(
        "--congestion-control",
        choices=CONGESTION_CONTROLS,
        help="QUIC congestion controller for what this end sends, with --quic-stack aioquic "
        f"(default: {DEFAULT_CONGESTION_CONTROL})",
    )
    p.add_argument(
        "--quic-stack",
        choices=QUIC_STACKS,
        help="QUIC implementation: qh3 (packets in native code: less CPU a packet, its own "
        "congestion control) or aioquic (packets in Python, --congestion-control) "
        f"(default: {DEFAULT_QUIC_STACK}, or aioquic when --congestion-control is given)",
    )
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--backoff-base", type=float, default=0.5)
    p.add_argument("--backoff-cap", type=float, default=30.0)
    p.add_argument("--no-terminal", action="store_true", help="refuse every terminal request")
    p.add_argument(
        "--terminal-user",
        metavar="NAME",
        help="user terminal sessions run as (default: nobody when the agent runs as root, "
        "else the agent's own user; root only when named)",
    )
    p.add_argument(
        "--workload-user",
        metavar="NAME",
        help="user process workloads run as (default: nobody when the agent runs as root, else "
        "the agent's own user; root only when named); compose and helm run as the agent",
    )
    p.add_argument("--terminal-max-sessions", type=int, default=4)
    p.add_argument("--terminal-idle-timeout", type=float, default=900.0)
    p.add_argument(
        "--buffer-max-bytes", type=int, default=256 << 20, help="telemetry buffer bound in bytes"
    )
    p.add_argument("--buffer-policy", choices=("drop-oldest", "reject"), default="drop-oldest")
    p.add_argument(
        "--commit-window-ms", type=float, default=2.0, help="telemetry group-commit window"
    )
    p.add_argument("--metrics-interval", type=float, default=30.0)
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at GET /metrics on this listener (default: off)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    return p


def emit_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} emit", description="Write one telemetry record.")
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--stream", required=True)
    p.add_argument("json", help="the record: a JSON object")
    args = p.parse_args(argv)
    from agent.telemetry.emit_cmd import run_emit

    return run_emit(args.state, args.stream, args.json)


def enroll_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog=f"{PROG} enroll",
        description="Enrol this device over EST: a key generated here, a one-time bootstrap token.",
    )
    p.add_argument(
        "--controller", required=True, help="the EST HOST:PORT of one controller (any of a cluster)"
    )
    p.add_argument("--tenant", required=True)
    p.add_argument("--device", required=True, help="this device's id")
    p.add_argument("--token-file", required=True, type=Path, help="from margo-certs bootstrap")
    p.add_argument(
        "--ca-file", required=True, type=Path, help="CA of the EST server (DIR/controller/ca.pem)"
    )
    p.add_argument("--identity", required=True, type=Path, help="identity directory to write")
    args = p.parse_args(argv)
    os.umask(0o077)
    import anyio

    from agent.enroll import enroll

    try:
        if "," in args.controller:  # a one-time token: enrol with one controller, not a list
            raise ConfigError(f"--controller {args.controller!r}: enroll takes one HOST:PORT")
        parse_host_port(args.controller, what="--controller")
        cert = anyio.run(
            enroll,
            args.controller,
            args.tenant,
            args.device,
            args.token_file,
            args.ca_file,
            args.identity,
        )
    except MargoError as exc:
        return fail(f"{PROG} enroll", str(exc))
    except OSError as exc:
        return fail(f"{PROG} enroll", f"{exc.filename or args.identity}: {exc.strerror or exc}")
    print(
        f"enrolled {args.tenant}/{args.device} until "
        f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}: {args.identity}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["emit"]:
        return emit_main(argv[1:])
    if argv[:1] == ["enroll"]:
        return enroll_main(argv[1:])
    args = build_parser().parse_args(argv)
    # What the agent creates is its own: state files 0600, directories 0700. The few paths a
    # workload needs are opened up explicitly (agent.runtime.workdirs); children start with 022.
    os.umask(0o077)
    setup_logging(args.log_level, args.log_format)
    try:
        controllers = parse_controllers(args.controller)
        tcp_controllers: tuple[ControllerEntry, ...] = ()
        if args.tcp_controller:
            tcp_controllers = parse_controllers(args.tcp_controller, what="--tcp-controller")
            if len(tcp_controllers) not in (1, len(controllers)):
                raise ConfigError(
                    f"--tcp-controller {args.tcp_controller!r}: {len(tcp_controllers)} entries "
                    f"for {len(controllers)} --controller entries; give one for all, or one "
                    "per --controller entry"
                )
        quic_stack = args.quic_stack or (
            "aioquic" if args.congestion_control is not None else DEFAULT_QUIC_STACK
        )
        if quic_stack == "qh3" and args.congestion_control is not None:
            raise ConfigError(
                f"--congestion-control {args.congestion_control} applies to --quic-stack "
                "aioquic only: qh3 uses its own congestion controller"
            )
        if args.proxy:
            parse_proxy_url(args.proxy)  # refused now, not at the first fallback
        metrics = parse_host_port(args.metrics, what="--metrics") if args.metrics else (None, 0)
        config = AgentConfig(
            identity=args.identity,
            controllers=controllers,
            tcp_controllers=tcp_controllers,
            quic_timeout=parse_duration(args.quic_timeout, what="--quic-timeout"),
            quic_retry=parse_duration(args.quic_retry, what="--quic-retry"),
            proxy=args.proxy or None,
            controller_order_seed=args.controller_order_seed,
            server_name=args.server_name,
            state=args.state,
            labels=_labels(args.label),
            keepalive=args.keepalive,
            idle_timeout=args.idle_timeout,
            congestion_control=args.congestion_control or DEFAULT_CONGESTION_CONTROL,
            quic_stack=quic_stack,
            connect_timeout=args.connect_timeout,
            backoff_base=args.backoff_base,
            backoff_cap=args.backoff_cap,
            terminal_enabled=not args.no_terminal,
            terminal_max_sessions=args.terminal_max_sessions,
            terminal_idle_timeout=args.terminal_idle_timeout,
            buffer_max_bytes=args.buffer_max_bytes,
            buffer_policy=args.buffer_policy,
            commit_window_ms=args.commit_window_ms,
            metrics_interval=args.metrics_interval,
            metrics_host=metrics[0],
            metrics_port=metrics[1],
            workload_user=args.workload_user,
            terminal_user=args.terminal_user,
        )
        from agent.enroll import recover_identity
        from agent.features import build_agent

        recover_identity(config.identity)  # a renewal a crash interrupted
        agent = build_agent(config)
    except ValidationError as exc:
        first = exc.errors()[0]
        return fail(PROG, f"{'.'.join(map(str, first['loc']))}: {first['msg']}")
    except MargoError as exc:
        return fail(PROG, str(exc))
    return run_service(PROG, agent.run, agent.shutdown)


if __name__ == "__main__":
    raise SystemExit(main())
