"""``margo-bench run`` and ``margo-bench compare``: the same scenario over each transport, on the
same machine, in the same invocation, with the same devices (one PKI per work directory).

``run SCENARIO --transport T`` runs one transport; ``compare --transports a,b,c --scenario S``
runs them side by side, ``--runs`` times, rotating which transport goes first, then writes the
report (:mod:`bench.report`). A transport may carry its poll interval: ``rest-poll@1`` polls
every second; plain ``rest-poll`` uses ``--poll-interval`` (15 s, Margo's sandbox agent).

Output: ``<out>/<scenario>-<transports>.json`` with every raw figure, the parameters, the
command, the machine and its load average before and after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.fleet import TRANSPORTS
from bench.report_util import machine_info, raise_nofile_limit, write_json

SCENARIOS = {
    name: f"bench.scenarios.{name}" for name in ("connect", "push", "lossy", "storm", "drain")
}
PROG = "margo-bench"
KIND = "margo-bench transports"


def parse_transport(spec: str, poll_interval: float) -> tuple[str, str, float]:
    """``rest-poll@5`` -> (label ``rest-poll 5 s``, transport, interval)."""
    name, _, interval = spec.partition("@")
    if name not in TRANSPORTS:
        raise argparse.ArgumentTypeError(
            f"unknown transport {name!r} (one of {', '.join(TRANSPORTS)})"
        )
    if name != "rest-poll":
        if interval:
            raise argparse.ArgumentTypeError(f"only rest-poll takes an @interval, not {spec!r}")
        return name, name, poll_interval
    seconds = float(interval) if interval else poll_interval
    return f"rest-poll {seconds:g} s", name, seconds


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agents", type=int, default=100, help="simulated devices per transport")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="report directory")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--procs", type=int, default=2, help="fleet worker processes")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=15.0,
        help="rest-poll interval, seconds (Margo's sandbox agent: 15)",
    )
    p.add_argument(
        "--keepalive",
        type=float,
        default=20.0,
        help="QUIC keepalive the controller sets (its default)",
    )
    p.add_argument("--concurrency", type=int, default=100, help="connects in flight per worker")
    p.add_argument("--work", type=Path, help="work directory (PKI, logs); kept if given")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a scenario parameter (see each scenario's DEFAULTS), repeatable",
    )
    p.add_argument("--no-report", action="store_true", help="write the JSON only")


def scenario_params(module: Any, args: argparse.Namespace) -> dict[str, Any]:
    params = dict(module.DEFAULTS)
    params.update(
        agents=args.agents, procs=args.procs, keepalive=args.keepalive, concurrency=args.concurrency
    )
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        try:
            params[key] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            params[key] = value
    return params


async def run_all(
    module: Any,
    specs: list[tuple[str, str, float]],
    params: dict[str, Any],
    runs: int,
    work: Path,
    checkpoint: Any = None,
) -> list[dict[str, Any]]:
    from bench.scenarios.common import run_one

    out = []
    for run in range(runs):
        order = specs[run % len(specs) :] + specs[: run % len(specs)]
        for label, transport, interval in order:
            print(
                f"== {module.NAME}, run {run + 1}/{runs}: {label}, {params['agents']} devices",
                file=sys.stderr,
                flush=True,
            )
            tag = f"{module.NAME}-{label.replace(' ', '')}-{run + 1}"
            try:
                result = await run_one(
                    module, transport, {**params, "poll_interval": interval}, work, tag
                )
            except Exception as exc:  # noqa: BLE001 - one transport failing must not lose the others
                result = {
                    "transport": transport,
                    "error": f"{type(exc).__name__}: {exc}",
                    "summary": {},
                    "load": {"before": os.getloadavg(), "after": os.getloadavg()},
                }
            result.update(label=label, run=run + 1)
            out.append(result)
            print(
                f"   {label}: {result.get('error') or result['summary']}",
                file=sys.stderr,
                flush=True,
            )
            if checkpoint is not None:
                checkpoint(out)
    return out


def execute(
    scenario: str,
    specs: list[tuple[str, str, float]],
    args: argparse.Namespace,
    argv: list[str],
    command: str,
) -> int:
    """Run, write the JSON and the report; returns the exit status: 1 when a transport produced
    no result in any run (its work directory is then kept, and the logs to read are named)."""
    module = importlib.import_module(SCENARIOS[scenario])
    params = scenario_params(module, args)
    raise_nofile_limit()
    work = args.work or Path(tempfile.mkdtemp(prefix="margo-bench-transports-"))
    work.mkdir(parents=True, exist_ok=True)
    names = "-".join(label.replace(" ", "") for label, _, _ in specs)
    path = args.out / f"{scenario}-{names}.json"

    def save(runs: list[dict[str, Any]]) -> None:
        """Rewritten after every transport's run, so an aborted comparison keeps what it had."""
        write_json(
            path,
            {
                "kind": KIND,
                "scenario": scenario,
                "command": f"{command} {' '.join(argv)}".strip(),
                "params": params,
                "transports": [label for label, _, _ in specs],
                "machine": {**machine_info(), "loadavg_at_end": os.getloadavg()},
                "runs": runs,
            },
        )

    runs: list[dict[str, Any]] = []
    try:
        runs = asyncio.run(run_all(module, specs, params, args.runs, work, save))
    finally:
        failed = [label for label, _, _ in specs if not any_result(runs, label)]
        if args.work is None and not failed:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path}", file=sys.stderr)
    if not args.no_report:
        from bench.report import write

        for written in write(args.out):
            print(f"wrote {written}", file=sys.stderr)
    for label in failed:
        errors = sorted({str(r.get("error")) for r in runs if r.get("label") == label})
        logs = sorted(str(p) for p in work.glob(f"data-{scenario}-{label.replace(' ', '')}-*"))
        print(
            f"{PROG}: {label}: no result in {args.runs} run(s): {'; '.join(errors) or 'none'}\n"
            f"  read the controller's log in each of: {', '.join(logs) or str(work)}"
            " (controller.log; the fleet workers' logs beside it)",
            file=sys.stderr,
        )
    return 1 if failed else 0


def any_result(runs: list[dict[str, Any]], label: str) -> bool:
    """Whether ``label`` produced a result (not an error) in at least one run."""
    return any(r.get("label") == label and not r.get("error") for r in runs)


def run_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="margo-bench run", description="One scenario over one transport."
    )
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--transport", required=True)
    add_common(p)
    args = p.parse_args(argv)
    spec = parse_transport(args.transport, args.poll_interval)
    return execute(args.scenario, [spec], args, argv, "margo-bench run")


def compare_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="margo-bench compare",
        description="One scenario over several transports, side by side.",
    )
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    p.add_argument(
        "--transports",
        default=",".join(TRANSPORTS),
        help="comma-separated; rest-poll@SECONDS sets that poll interval",
    )
    add_common(p)
    args = p.parse_args(argv)
    specs = [
        parse_transport(s.strip(), args.poll_interval)
        for s in args.transports.split(",")
        if s.strip()
    ]
    return execute(args.scenario, specs, args, argv, "margo-bench compare")


main = compare_main
