"""``margoctl rollout``: staged rollouts with health gates and automatic rollback.

    margoctl rollout create NAME -f FILE (--device ID ... | --selector k=v ...) --steps 1,10%,100%
        [--max-failures N|N%] [--healthy-for 30s] [--step-timeout 5m] [--no-auto-rollback]
    margoctl rollout pause|resume|abort NAME        (abort rolls back)
    margoctl rollout watch NAME [--interval S]      a live progress bar per step
    margoctl get rollouts [-o table|json|yaml]      margoctl get rollout NAME [-o ...]

The document is signed with the operator's key as ``apply`` signs it; the controller assigns
it step by step. ``watch`` ends when the rollout does, with exit status 0 if it succeeded and
1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from margo_stream.api_client import ApiClient
from margo_stream.cli import output
from margo_stream.cli.signing import sign_documents
from margo_stream.errors import ConfigError, MargoError
from margo_stream.identity.authored import sign_deployment
from margo_stream.identity.operator_files import OperatorCredentials

FINISHED = ("succeeded", "failed", "rolled-back")
BAR = 24

ReadDocuments = Callable[[Sequence[str]], tuple[list[str], list[str]]]
Credentials = Callable[[argparse.Namespace], OperatorCredentials]


class RolloutUnsuccessful(MargoError):
    """``rollout watch``: the rollout ended otherwise than ``succeeded``."""


def add_get_parsers(kinds: Any, common: argparse.ArgumentParser) -> None:
    p = kinds.add_parser("rollouts", help="the tenant's rollouts", parents=[common])
    p.add_argument("-o", "--output", choices=output.FORMATS, default="table")
    p = kinds.add_parser("rollout", help="one rollout, step by step", parents=[common])
    p.add_argument("name", metavar="NAME")
    p.add_argument("-o", "--output", choices=output.FORMATS, default="table")


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    rollout = commands.add_parser(
        "rollout", help="staged rollouts with health gates", parents=[common]
    )
    actions = rollout.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=type(rollout)
    )
    p = actions.add_parser("create", help="start a rollout of one document", parents=[common])
    p.add_argument("name", metavar="NAME")
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="one deployment YAML")
    p.add_argument("--device", dest="devices", action="append", default=[], metavar="ID")
    p.add_argument(
        "--selector",
        dest="selectors",
        action="append",
        default=[],
        metavar="K=V",
        help="target devices by operator label (joiners get the current phase's revision)",
    )
    p.add_argument(
        "--steps", required=True, metavar="LIST", help="cumulative counts or shares: 1,10%%,100%%"
    )
    p.add_argument(
        "--max-failures", default="0", metavar="N|N%", help="per step and overall (default 0)"
    )
    p.add_argument(
        "--healthy-for", default="30s", metavar="DURATION", help="health gate (default 30s)"
    )
    p.add_argument("--step-timeout", default="5m", metavar="DURATION", help="per step (default 5m)")
    p.add_argument(
        "--auto-rollback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="roll back every device that got the revision when over budget (default on)",
    )
    p.add_argument("-o", "--output", choices=output.FORMATS, default="table")
    for name, text in (
        ("pause", "hold the rollout: no new step starts, no timeout counts"),
        ("resume", "carry on a paused rollout"),
        ("abort", "stop the rollout and roll back every device that got the revision"),
    ):
        p = actions.add_parser(name, help=text, description=text, parents=[common])
        p.add_argument("name", metavar="NAME")
        p.add_argument("-o", "--output", choices=output.FORMATS, default="table")
    p = actions.add_parser("watch", help="live progress per step", parents=[common])
    p.add_argument("name", metavar="NAME")
    p.add_argument("--interval", type=float, default=0.5, metavar="SECONDS")


def _path(name: str) -> str:
    return f"/api/v1/rollouts/{name}"


def cmd_get(client: ApiClient, args: argparse.Namespace) -> None:
    if args.kind == "rollouts":
        data: Any = client._object("GET", "/api/v1/rollouts").get("items", [])
        text = rollouts_table(data) if args.output == "table" else None
    else:
        data = client._object("GET", _path(args.name))
        text = rollout_detail(data) if args.output == "table" else None
    sys.stdout.write((text if text is not None else output.render_data(data, args.output)) + "\n")


def cmd_rollout(
    client: ApiClient,
    args: argparse.Namespace,
    read_documents: ReadDocuments,
    credentials: Credentials,
) -> None:
    if args.action == "create":
        data = _create(client, args, read_documents, credentials)
    elif args.action == "watch":
        watch(client, args.name, args.interval)
        return
    else:
        data = client._object("POST", f"{_path(args.name)}/{args.action}")
    if args.output != "table":
        sys.stdout.write(output.render_data(data, args.output) + "\n")
    else:
        sys.stdout.write(f"rollout {data['name']}: {data['state']}\n")


def _create(
    client: ApiClient,
    args: argparse.Namespace,
    read_documents: ReadDocuments,
    credentials: Credentials,
) -> dict[str, Any]:
    if bool(args.devices) == bool(args.selectors):
        raise ConfigError("give the targets as --device ID ... or as --selector k=v ...")
    selector: dict[str, str] = {}
    for value in args.selectors:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise ConfigError(f"invalid --selector {value!r}: expected KEY=VALUE")
        selector[key] = val
    texts, blobs = read_documents([args.file])
    creds = credentials(args)
    body: dict[str, Any] = {
        "name": args.name,
        "documents": texts,
        "signatures": sign_documents(texts, creds),
        "certificate": creds.certificate,
        "steps": args.steps,
        "maxFailures": args.max_failures,
        "healthyFor": args.healthy_for,
        "stepTimeout": args.step_timeout,
        "autoRollback": args.auto_rollback,
    }
    if args.devices:
        body["devices"] = args.devices
    if selector:
        body["selector"] = selector
    if blobs:
        body["blobs"] = blobs
    body["rollbackSignatures"] = rollback_signatures(client, texts, creds)
    return client._object("POST", "/api/v1/rollouts", body=body)


def rollback_signatures(
    client: ApiClient, texts: Sequence[str], creds: OperatorCredentials
) -> dict[str, dict[str, Any]]:
    """The operator's signature of every other version of the deployment that the tenant's
    devices have now, signed after the new revision: what a rollback may give them back (a
    device takes a version only with a signature newer than the one it holds)."""
    from margo_stream.state.documents import parse_deployments

    if creds.key is None or creds.tenant is None:
        return {}
    ids = {d.deployment_id for t in texts for d in parse_deployments(t.encode("utf-8"), "-f")}
    if len(ids) != 1:
        return {}  # the controller says why: a rollout rolls out one deployment
    (deployment_id,) = ids
    digests = {
        item["digest"]
        for item in client.list_deployments()
        if item.get("deploymentId") in ids and item.get("digest")
    }
    later = dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=1)
    return {
        digest: sign_deployment(creds.tenant, deployment_id, digest, creds.key, now=later)
        for digest in sorted(digests)
    }


# -- rendering ---------------------------------------------------------------------------------


def rollouts_table(items: Sequence[dict[str, Any]], now: float | None = None) -> str:
    rows = [
        [
            r["name"],
            r["state"],
            f"{r.get('current_step') or 0}/{len(r['steps'])}",
            r["deploymentId"],
            len(r["targets"]),
            len(r["failures"]),
            output.age(r.get("created_at"), now),
        ]
        for r in items
    ]
    return output.render_table(
        ("NAME", "STATE", "STEP", "DEPLOYMENT", "TARGETS", "FAILED", "AGE"), rows
    )


def bar(done: int, failed: int, total: int, width: int = BAR) -> str:
    if total == 0:
        return "[" + " " * width + "]"
    ok = round(width * done / total)
    bad = min(width - ok, round(width * failed / total))
    return "[" + "#" * ok + "x" * bad + "." * (width - ok - bad) + "]"


def step_lines(item: dict[str, Any]) -> list[str]:
    lines = []
    for step in item["steps"]:
        total = len(step["devices"])
        state = step.get("result") or ("running" if step.get("started_at") else "waiting")
        lines.append(
            f"step {step['step']} ({step['target']:>4}) "
            f"{bar(step['installed'], step['failed'], total)} "
            f"{step['installed']}/{total} installed, {step['failed']} failed, "
            f"{step['pending']} pending  {state}"
        )
    return lines


def rollout_detail(item: dict[str, Any]) -> str:
    head = [
        f"rollout {item['name']}: {item['state']}"
        + (f" ({item['reason']})" if item.get("reason") else ""),
        f"deployment {item['deploymentId']} {item['digest'][:19]}, {len(item['targets'])}"
        f" targets, max failures {item['maxFailures']}, healthy for {item['healthyFor']:g}s,"
        f" step timeout {item['stepTimeout']:g}s, auto-rollback"
        f" {'on' if item['autoRollback'] else 'off'}",
    ]
    failures = [f"  {f['device']} (step {f['step']}): {f['reason']}" for f in item["failures"]]
    return "\n".join(head + step_lines(item) + (["failures:", *failures] if failures else []))


def watch(client: ApiClient, name: str, interval: float) -> None:
    """Redraw the rollout's steps in place on a terminal (a new block per change otherwise)
    until it ends; ``RolloutUnsuccessful`` unless it succeeded."""
    tty = sys.stdout.isatty()
    drawn = 0
    last = ""
    while True:
        item = client._object("GET", _path(name))
        text = rollout_detail(item)
        if text != last:
            if tty and drawn:
                sys.stdout.write(f"\x1b[{drawn}F\x1b[J")
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            drawn, last = text.count("\n") + 1, text
        if item["state"] in FINISHED:
            if item["state"] != "succeeded":
                raise RolloutUnsuccessful(
                    f"rollout {name} ended {item['state']}"
                    + (f": {item['reason']}" if item.get("reason") else "")
                )
            return
        time.sleep(max(0.1, interval))
