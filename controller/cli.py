"""``margo-controller``: the QUIC listener, the operator API and the store, in one process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from controller.config import ControllerConfig
from margo_stream.cli.common import fail, run_service
from margo_stream.errors import ConfigError
from margo_stream.identity.bootstrap import parse_duration
from margo_stream.logs import setup_logging
from margo_stream.transport.congestion import CONGESTION_CONTROLS, DEFAULT_CONGESTION_CONTROL
from margo_stream.transport.quic_client import parse_host_port
from margo_stream.units import parse_size

PROG = "margo-controller"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run the margo-stream controller.")
    p.add_argument("--certs", required=True, type=Path, help="directory made by margo-certs init")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="state directory (the SQLite store, unless --store names PostgreSQL)",
    )
    p.add_argument(
        "--store",
        metavar="DSN",
        help="keep the controller's state in PostgreSQL, postgresql://USER[:PASSWORD]@HOST"
        "[:PORT]/DB (several controllers may share it); default: SQLite in --data",
    )
    p.add_argument("--listen", default="127.0.0.1:4433", help="QUIC HOST:PORT (UDP)")
    p.add_argument(
        "--tcp-listen",
        metavar="HOST:PORT",
        help="also carry the device channel over TCP (HTTP/2 over mutual TLS 1.3), for "
        "networks that block UDP or allow only an HTTP proxy (default: off)",
    )
    p.add_argument("--api", default="127.0.0.1:8080", help="operator API HOST:PORT")
    p.add_argument("--api-tls-cert", type=Path, help="TLS certificate for a non-loopback API")
    p.add_argument("--api-tls-key", type=Path, help="TLS key for a non-loopback API")
    p.add_argument(
        "--margo-api",
        metavar="HOST:PORT",
        help="also serve Margo's rc.3 device pull API (HTTPS, client certificates)",
    )
    p.add_argument(
        "--h2-push",
        metavar="HOST:PORT",
        help="also serve the HTTP/2 push transport (used by the transport bench)",
    )
    p.add_argument(
        "--enroll",
        metavar="HOST:PORT",
        help="also serve EST enrolment (RFC 7030) over HTTPS for devices with a bootstrap token",
    )
    p.add_argument(
        "--device-cert-lifetime",
        default="30d",
        metavar="DURATION",
        help="lifetime of certificates issued by --enroll, e.g. 90s, 12h, 30d (default 30d)",
    )
    p.add_argument(
        "--max-connection-age",
        default="24h",
        metavar="DURATION",
        help="close device connections older than this, jittered by 10%% (default 24h)",
    )
    p.add_argument(
        "--congestion-control",
        choices=CONGESTION_CONTROLS,
        default=DEFAULT_CONGESTION_CONTROL,
        help="QUIC congestion controller for what this end sends (default: %(default)s)",
    )
    p.add_argument("--idle-timeout", type=float, default=60.0, help="QUIC idle timeout, seconds")
    p.add_argument(
        "--keepalive",
        type=float,
        default=20.0,
        help="keepalive interval agents are told to use, seconds",
    )
    p.add_argument(
        "--push-window",
        type=int,
        default=512,
        metavar="N",
        help="at most this many desired-state pushes awaiting their device's answer at once;"
        " the window is learnt below it from how long answers take (default 512)",
    )
    p.add_argument(
        "--quic-retry",
        choices=("always", "auto", "never"),
        default="auto",
        help="QUIC address validation (Retry): always, only under load (default), or never",
    )
    p.add_argument(
        "--handshake-timeout",
        default="5s",
        metavar="DURATION",
        help="free a QUIC handshake that has not completed after this (default 5s)",
    )
    p.add_argument(
        "--max-half-open",
        type=int,
        default=2048,
        metavar="N",
        help="QUIC handshakes in progress at once, all sources (default 2048)",
    )
    p.add_argument(
        "--max-half-open-per-address",
        type=int,
        default=256,
        metavar="N",
        help="unvalidated QUIC handshakes in progress per source address (default 256)",
    )
    p.add_argument(
        "--api-max-body",
        default="8MiB",
        metavar="SIZE",
        help="largest operator API request body; larger ones get 413 (default 8MiB)",
    )
    p.add_argument(
        "--telemetry-retention",
        default="7d",
        metavar="DURATION",
        help="delete telemetry older than this (default 7d)",
    )
    p.add_argument(
        "--telemetry-max-bytes",
        default="1GiB",
        metavar="SIZE",
        help="per tenant, delete the oldest telemetry beyond this size (default 1GiB)",
    )
    p.add_argument(
        "--event-retention",
        default="90d",
        metavar="DURATION",
        help="delete events older than this (default 90d)",
    )
    p.add_argument(
        "--audit-retention",
        default="365d",
        metavar="DURATION",
        help="delete terminal session audit records older than this (default 365d)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N controller processes sharing the QUIC and API ports (SO_REUSEPORT); "
        "needs --store postgresql://... (default 1)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at GET /metrics on this listener (default: off)",
    )
    p.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="forward device telemetry (OTLP logs) and the controller's metrics to this "
        "OpenTelemetry collector, OTLP over HTTP/protobuf, e.g. http://127.0.0.1:4318",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=("json", "text"), default="json")
    return p


def config_from_args(args: argparse.Namespace) -> ControllerConfig:
    listen_host, listen_port = parse_host_port(args.listen, what="--listen")
    api_host, api_port = parse_host_port(args.api, what="--api")
    margo = parse_host_port(args.margo_api, what="--margo-api") if args.margo_api else (None, 0)
    h2 = parse_host_port(args.h2_push, what="--h2-push") if args.h2_push else (None, 0)
    enroll = parse_host_port(args.enroll, what="--enroll") if args.enroll else (None, 0)
    tcp = parse_host_port(args.tcp_listen, what="--tcp-listen") if args.tcp_listen else (None, 0)
    metrics = parse_host_port(args.metrics, what="--metrics") if args.metrics else (None, 0)
    lifetime = parse_duration(args.device_cert_lifetime, what="--device-cert-lifetime")
    max_age = parse_duration(args.max_connection_age, what="--max-connection-age")
    handshake_timeout = parse_duration(args.handshake_timeout, what="--handshake-timeout")
    api_max_body = parse_size(args.api_max_body, what="--api-max-body")
    telemetry_retention = parse_duration(args.telemetry_retention, what="--telemetry-retention")
    telemetry_max_bytes = parse_size(args.telemetry_max_bytes, what="--telemetry-max-bytes")
    event_retention = parse_duration(args.event_retention, what="--event-retention")
    audit_retention = parse_duration(args.audit_retention, what="--audit-retention")
    try:
        return ControllerConfig(
            certs=args.certs,
            data=args.data,
            listen_host=listen_host,
            listen_port=listen_port,
            api_host=api_host,
            api_port=api_port,
            api_tls_cert=args.api_tls_cert,
            api_tls_key=args.api_tls_key,
            margo_api_host=margo[0],
            margo_api_port=margo[1],
            h2_push_host=h2[0],
            h2_push_port=h2[1],
            tcp_host=tcp[0],
            tcp_port=tcp[1],
            idle_timeout=args.idle_timeout,
            congestion_control=args.congestion_control,
            keepalive=args.keepalive,
            push_window=args.push_window,
            enroll_host=enroll[0],
            enroll_port=enroll[1],
            device_cert_lifetime=lifetime,
            max_connection_age=max_age,
            quic_retry=args.quic_retry,
            handshake_timeout=handshake_timeout,
            max_half_open=args.max_half_open,
            max_half_open_per_address=args.max_half_open_per_address,
            api_max_body=api_max_body,
            telemetry_retention=telemetry_retention,
            telemetry_max_bytes=telemetry_max_bytes,
            event_retention=event_retention,
            audit_retention=audit_retention,
            store=args.store,
            metrics_host=metrics[0],
            metrics_port=metrics[1],
            otlp_endpoint=args.otlp_endpoint,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(
            f"{'.'.join(map(str, first['loc'])) or 'config'}: {first['msg']}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        return fail(PROG, str(exc))
    if args.workers != 1 and args.metrics:
        return fail(PROG, "--metrics serves one process's metrics: not with --workers (yet)")
    if args.workers != 1:
        from controller.workers import split_workers, supervise

        try:
            workers, rest = split_workers(argv)
        except ConfigError as exc:
            return fail(PROG, str(exc))
        return supervise(PROG, workers, config, rest)
    from controller.service import Controller

    controller = Controller(config)
    return run_service(
        PROG, controller.run, controller.shutdown, on_reload=controller.request_reload
    )


if __name__ == "__main__":
    raise SystemExit(main())
