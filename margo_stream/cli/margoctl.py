"""margoctl: the operator's command line for the controller's HTTP API.

    margoctl [--api URL] [--operator DIR | --token-file PATH] [--ca-file PATH] COMMAND ...

    get devices [-o table|json|yaml]          get device ID [-o ...]
    get deployments [--device ID] [-o ...]    get sessions [-o ...]
    get telemetry --device ID [--stream S] [--since T] [--after N] [--limit N] [-o ...]
    get events [--after N] [-o ...]           get operators [-o ...]
    apply -f FILE [-f FILE ...] (--device ID ... | --selector k=v ...)
    delete deployment ID --device ID
    label device ID k=v ... [k- ...]          operator labels: what --selector k=v matches
    device revoke ID | device allow ID        the device's identity on the allow-list (admin)
    reload                                    re-read CA bundles, operators, allow files (admin)
    watch [--after N] [--count N] [-o table|json]
    rollout create NAME -f FILE (--device ID ... | --selector k=v ...) --steps 1,10%,100%
        [--max-failures N|N%] [--healthy-for 30s] [--step-timeout 5m] [--no-auto-rollback]
    rollout pause|resume|abort|watch NAME     get rollouts | get rollout NAME [-o ...]
    terminal DEVICE [-- CMD ...]              exec DEVICE -- CMD ...

``--api`` defaults to ``$MARGO_API`` or http://127.0.0.1:8080; ``--operator`` to
``$MARGO_OPERATOR`` (an operator directory, ``DIR/<tenant>/operators/<name>``), ``--token-file``
to ``$MARGO_TOKEN_FILE`` (e.g. the tenant's ``operator.token``; the key and certificate beside
it are used when present). Global flags may come anywhere.
Errors are one line, ``margoctl: error: ...``, with exit status 1.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from margo_stream.api_client import ApiClient
from margo_stream.cli import (
    margoctl_device,
    margoctl_label,
    margoctl_logs,
    margoctl_rollout,
    margoctl_terminal,
    output,
)
from margo_stream.cli.signing import sign_documents
from margo_stream.errors import ConfigError, MargoError
from margo_stream.identity.operator_files import OperatorCredentials, load_operator_credentials
from margo_stream.state.digest import sha256_digest

DEFAULT_API = "http://127.0.0.1:8080"
PROG = "margoctl"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own usage errors keep exit status 2
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def _global_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--api",
        metavar="URL",
        default=default,
        help=f"controller API (env MARGO_API, default {DEFAULT_API})",
    )
    parser.add_argument(
        "--operator",
        metavar="DIR",
        default=default,
        help="operator directory: operator.token, operator.key, operator.cert.json "
        "(env MARGO_OPERATOR)",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        default=default,
        help="operator token file; operator.key and operator.cert.json beside it are used "
        "when present (env MARGO_TOKEN_FILE)",
    )
    parser.add_argument(
        "--ca-file",
        metavar="PATH",
        default=default,
        help="CA bundle for an API served over TLS (env MARGO_CA_FILE)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=default,
        help="per-request timeout (default 10)",
    )


def _output_flag(parser: argparse.ArgumentParser, choices: Sequence[str] = output.FORMATS) -> None:
    parser.add_argument(
        "-o", "--output", choices=choices, default="table", help="output format (default table)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Operate a margo-stream controller.")
    _global_flags(parser, suppress=False)
    common = _Parser(add_help=False)
    _global_flags(common, suppress=True)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    get = commands.add_parser("get", help="show resources", parents=[common])
    kinds = get.add_subparsers(dest="kind", required=True, metavar="RESOURCE", parser_class=_Parser)
    p = kinds.add_parser("operators", help="the tenant's operators and roles", parents=[common])
    _output_flag(p)
    p = kinds.add_parser("devices", help="the tenant's devices", parents=[common])
    _output_flag(p)
    p = kinds.add_parser("device", help="one device", parents=[common])
    p.add_argument("id", metavar="ID")
    _output_flag(p)
    p = kinds.add_parser("deployments", help="deployments per device", parents=[common])
    p.add_argument("--device", metavar="ID")
    _output_flag(p)
    p = kinds.add_parser("telemetry", help="a device's stored telemetry", parents=[common])
    p.add_argument("--device", metavar="ID", required=True)
    p.add_argument("--stream", metavar="NAME")
    p.add_argument("--since", metavar="TIME", help="RFC 3339, unix seconds or an age (5m, 2h)")
    p.add_argument("--after", type=int, metavar="SEQ", help="only records after this seq")
    p.add_argument("--limit", type=int, metavar="N")
    _output_flag(p)
    p = kinds.add_parser("sessions", help="terminal session audit", parents=[common])
    p.add_argument("--limit", type=int, metavar="N")
    _output_flag(p)
    p = kinds.add_parser("events", help="the event feed", parents=[common])
    p.add_argument("--after", type=int, default=0, metavar="ID")
    p.add_argument("--limit", type=int, metavar="N")
    _output_flag(p)
    margoctl_rollout.add_get_parsers(kinds, common)

    p = commands.add_parser(
        "sign",
        help="sign deployment documents with the operator's key and print the apply body "
        "(JSON) for the web console's apply form; nothing is sent",
        parents=[common],
    )
    p.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        required=True,
        metavar="FILE",
        help="Margo ApplicationDeployment YAML ('-' for stdin); repeatable",
    )

    p = commands.add_parser("apply", help="apply deployment documents", parents=[common])
    p.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        required=True,
        metavar="FILE",
        help="Margo ApplicationDeployment YAML ('-' for stdin); repeatable",
    )
    p.add_argument(
        "--device",
        dest="devices",
        action="append",
        default=[],
        metavar="ID",
        help="target device; repeatable",
    )
    p.add_argument(
        "--selector",
        dest="selectors",
        action="append",
        default=[],
        metavar="K=V",
        help="target every device with this operator label (reported.K=V: the label the "
        "device reports of itself); repeatable (all must match)",
    )
    _output_flag(p)

    delete = commands.add_parser("delete", help="remove resources", parents=[common])
    kinds = delete.add_subparsers(
        dest="kind", required=True, metavar="RESOURCE", parser_class=_Parser
    )
    p = kinds.add_parser("deployment", help="remove a deployment from a device", parents=[common])
    p.add_argument("id", metavar="ID")
    p.add_argument("--device", metavar="ID", required=True)

    p = commands.add_parser("watch", help="follow the event feed", parents=[common])
    p.add_argument(
        "--after",
        type=int,
        metavar="ID",
        help="replay events after this id (0: everything); default: new events only",
    )
    p.add_argument("--count", type=int, metavar="N", help="stop after N events")
    _output_flag(p, ("table", "json"))
    margoctl_label.add_parsers(commands, common)
    margoctl_logs.add_parsers(commands, common)
    margoctl_device.add_parsers(commands, common)
    margoctl_terminal.add_parsers(commands, common)
    margoctl_rollout.add_parsers(commands, common)
    return parser


# -- configuration ---------------------------------------------------------------------------


def operator_credentials(args: argparse.Namespace) -> OperatorCredentials:
    """The operator's credentials: ``--operator`` or ``--token-file`` (flags before the
    environment's MARGO_OPERATOR and MARGO_TOKEN_FILE)."""
    operator, token_file = getattr(args, "operator", None), getattr(args, "token_file", None)
    if operator is None and token_file is None:
        operator = os.environ.get("MARGO_OPERATOR") or None
        token_file = None if operator else os.environ.get("MARGO_TOKEN_FILE") or None
    return load_operator_credentials(
        operator_dir=Path(operator) if operator else None,
        token_file=Path(token_file) if token_file else None,
    )


def make_client(args: argparse.Namespace) -> ApiClient:
    api = args.api or os.environ.get("MARGO_API") or DEFAULT_API
    token = operator_credentials(args).token
    ca_file = args.ca_file or os.environ.get("MARGO_CA_FILE")
    if ca_file and not Path(ca_file).is_file():
        raise ConfigError(f"CA file {ca_file} does not exist")
    return ApiClient(api, token, timeout=args.timeout or 10.0, verify=ca_file or True)


# -- commands --------------------------------------------------------------------------------


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


def _cmd_get(client: ApiClient, args: argparse.Namespace) -> None:
    kind = args.kind
    if kind in ("rollouts", "rollout"):
        margoctl_rollout.cmd_get(client, args)
        return
    if kind == "devices":
        data: Any = client.list_devices()
    elif kind == "device":
        data = client.get_device(args.id)
    elif kind == "deployments":
        data = client.list_deployments(args.device)
    elif kind == "telemetry":
        data = client.telemetry(
            args.device, stream=args.stream, since=args.since, after=args.after, limit=args.limit
        )
    elif kind == "sessions":
        data = client.list_sessions(args.limit)
    elif kind == "operators":
        data = client.list_operators()
    else:
        data = client.list_events(args.after, args.limit)
    _print(output.render(kind, data, args.output))


def _selector(values: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise ConfigError(f"invalid --selector {value!r}: expected KEY=VALUE")
        out[key] = val
    return out


def _read_documents(files: Sequence[str]) -> tuple[list[str], list[str]]:
    """The YAML texts, plus base64 contents of the extra files the documents reference that
    sit next to them (the controller stores those as blobs)."""
    from margo_stream.state.documents import parse_deployments

    texts: list[str] = []
    blobs: dict[str, str] = {}
    for name in files:
        try:
            if name == "-":
                text, base = sys.stdin.read(), Path.cwd()
            else:
                text, base = Path(name).read_text(encoding="utf-8"), Path(name).parent
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"cannot read {name}: {reason}") from None
        source = "<stdin>" if name == "-" else name
        for deployment in parse_deployments(text.encode("utf-8"), source):
            for ref in deployment.files:
                local = base / ref.name
                if not local.is_file():
                    continue  # perhaps already stored on the controller; it will say if not
                data = local.read_bytes()
                if sha256_digest(data) != ref.digest:
                    raise ConfigError(f"{local}: content does not match digest {ref.digest}")
                blobs[ref.digest] = base64.b64encode(data).decode("ascii")
        texts.append(text)
    return texts, list(blobs.values())


def _cmd_apply(client: ApiClient, args: argparse.Namespace) -> None:
    texts, blobs = _read_documents(args.files)
    creds = operator_credentials(args)
    signatures = sign_documents(texts, creds)
    result = client.apply(
        texts,
        devices=args.devices,
        selector=_selector(args.selectors),
        blobs=blobs,
        signatures=signatures,
        certificate=creds.certificate,
    )
    if args.output != "table":
        _print(output.render_data(result, args.output))
        return
    devices = result.get("devices") or []
    targets = ", ".join(devices) if devices else "no devices"
    for dep in result.get("deployments", []):
        _print(f"deployment {dep['deploymentId']} ({dep['digest'][:19]}) applied to {targets}")
    for skip in result.get("skipped") or []:  # device constraints the target does not meet
        _print(f"skipped {skip['deploymentId']} on {skip['device']}: {skip['reason']}")
    for note in result.get("notes") or []:
        _print(f"note: {note['deploymentId']}: {note['note']}")
    if not devices:
        sys.stderr.write(f"{PROG}: warning: no device matched; the deployments are stored only\n")


def _cmd_sign(args: argparse.Namespace) -> int:
    """What ``apply`` would send, signed here, on the operator's machine: the console takes it
    as it is, so the operator's key never reaches a page the controller serves."""
    import json

    texts, blobs = _read_documents(args.files)
    creds = operator_credentials(args)
    body: dict[str, object] = {
        "documents": texts,
        "signatures": sign_documents(texts, creds),
        "certificate": creds.certificate,
    }
    if blobs:
        body["blobs"] = blobs
    sys.stdout.write(json.dumps(body, indent=2) + "\n")
    return 0


def _cmd_delete(client: ApiClient, args: argparse.Namespace) -> None:
    client.delete_deployment(args.device, args.id)
    _print(f"deployment {args.id} removed from device {args.device}")


def _cmd_watch(client: ApiClient, args: argparse.Namespace) -> None:
    import json

    for event in client.stream_events(after=args.after, limit=args.count):
        line = (
            json.dumps(event, separators=(",", ":"))
            if args.output == "json"
            else (output.event_line(event))
        )
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _cmd_rollout(client: ApiClient, args: argparse.Namespace) -> None:
    margoctl_rollout.cmd_rollout(client, args, _read_documents, operator_credentials)


def _run_terminal(args: argparse.Namespace) -> int:
    try:
        client = make_client(args)
    except MargoError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    client.close()
    return margoctl_terminal.main(
        client.base_url,
        client.token,
        client.verify,
        args.timeout or 10.0,
        args,
        operator_credentials(args),
    )


COMMANDS = {
    "get": _cmd_get,
    "apply": _cmd_apply,
    "delete": _cmd_delete,
    "watch": _cmd_watch,
    "label": margoctl_label.cmd_label,
    "logs": margoctl_logs.cmd_logs,
    "device": margoctl_device.cmd_device,
    "reload": margoctl_device.cmd_reload,
    "rollout": _cmd_rollout,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("terminal", "exec"):
        return _run_terminal(args)
    try:
        if args.command == "sign":
            return _cmd_sign(args)
        with make_client(args) as client:
            COMMANDS[args.command](client, args)
    except MargoError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. margoctl watch | head
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
