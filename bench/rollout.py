"""``margo-bench rollout``: the orchestration overhead of a staged rollout.

One change of one deployment rolled out over the simulated fleet (``bench.fleet``: every
device runs the real QUIC client and session code, verifies each push and reports
``installed``) in steps ``1%,10%,100%`` with a 1 s health gate. First the fleet gets the
previous revision in one apply (so the rollout changes something every device runs), then one
``POST /api/v1/rollouts`` starts the rollout and the bench polls it until it ends.

Reported: total time (the request sent -> the rollout seen ``succeeded``), the sum of the
health gates (steps x ``--healthy-for``, the least any rollout of these steps can take), the
overhead (total minus the gates: the controller's driver ticks, assignment, signing and
pushing, the devices' install and status path), and per step its devices, its duration and
how long after its start the last device was installed (from the rollout's stored times).

    margo-bench rollout --agents 1000 [--steps 1%,10%,100%] [--healthy-for 1] [--procs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.report_util import (
    machine_info,
    markdown_table,
    raise_nofile_limit,
    write_json,
    write_markdown,
)
from bench.scenarios.common import Context, fan_out, run_one

NAME = "rollout"
DEFAULTS: dict[str, Any] = {
    "steps": "1%,10%,100%",
    "healthy_for": 1.0,
    "step_timeout": 120.0,
    "poll": 0.05,
}
FINISHED = ("succeeded", "failed", "rolled-back")


def _ts(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def measure(ctx: Context) -> dict[str, Any]:
    from bench.pushlat import document

    p = ctx.params
    timeout = 60 + ctx.agents / 20
    baseline = await fan_out(ctx, f"before-{time.time_ns()}", timeout)
    body = ctx.signer.body(
        [document(f"after-{time.time_ns()}")],
        name=f"bench-{time.time_ns()}",
        devices=ctx.devices(),
        steps=str(p["steps"]),
        maxFailures="0",
        healthyFor=float(p["healthy_for"]),
        stepTimeout=float(p["step_timeout"]),
    )
    async with ctx.client() as client:
        t0 = time.monotonic()
        wall0 = time.time()
        r = await client.post("/api/v1/rollouts", json=body)
        r.raise_for_status()
        created_s = time.monotonic() - t0
        name = r.json()["name"]
        deadline = t0 + float(p["step_timeout"]) * 3 + 60
        item = r.json()
        while item["state"] not in FINISHED and time.monotonic() < deadline:
            await asyncio.sleep(float(p["poll"]))
            r = await client.get(f"/api/v1/rollouts/{name}")
            r.raise_for_status()
            item = r.json()
        total = time.monotonic() - t0
    steps = []
    for step in item["steps"]:
        started, finished = _ts(step["started_at"]), _ts(step["finished_at"])
        steps.append(
            {
                "target": step["target"],
                "devices": len(step["devices"]),
                "installed": step["installed"],
                "failed": step["failed"],
                "start_s": None if started is None else started - wall0,
                "seconds": None if started is None or finished is None else finished - started,
            }
        )
    gates = float(p["healthy_for"]) * len(item["steps"])
    return {
        "baseline_fanout_s": baseline.get("seconds"),
        "state": item["state"],
        "create_request_s": created_s,
        "total_s": total,
        "gates_s": gates,
        "overhead_s": total - gates,
        "steps": steps,
        "failures": item["failures"][:10],
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    r = result.get(NAME, {})
    return {
        "state": r.get("state"),
        "total_s": r.get("total_s"),
        "gates_s": r.get("gates_s"),
        "overhead_s": r.get("overhead_s"),
        "devices": result.get("connect", {}).get("connected"),
    }


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(result: dict[str, Any], command: str) -> str:
    r = result[NAME]
    head = markdown_table(
        (
            "devices",
            "steps",
            "state",
            "total s",
            "sum of gates s",
            "overhead s",
            "create request s",
        ),
        [
            [
                result["connect"]["connected"],
                result["params"]["steps"],
                r["state"],
                f"{r['total_s']:.2f}",
                f"{r['gates_s']:.2f}",
                f"{r['overhead_s']:.2f}",
                f"{r['create_request_s']:.3f}",
            ]
        ],
    )
    rows = [
        [i + 1, s["target"], s["devices"], s["failed"], _secs(s["start_s"]), _secs(s["seconds"])]
        for i, s in enumerate(r["steps"])
    ]
    table = markdown_table(
        ("step", "target", "devices", "failed", "started at s", "duration s (gate incl.)"), rows
    )
    return f"`{command}`\n\n{head}\n{table}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="margo-bench rollout", description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, default=1000, help="simulated devices")
    p.add_argument("--steps", default=DEFAULTS["steps"], help="cumulative steps")
    p.add_argument("--healthy-for", type=float, default=DEFAULTS["healthy_for"], metavar="S")
    p.add_argument("--step-timeout", type=float, default=DEFAULTS["step_timeout"], metavar="S")
    p.add_argument("--procs", type=int, default=2, help="fleet worker processes")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="report directory")
    p.add_argument("--work", type=Path, help="work directory (PKI, logs); kept if given")
    args = p.parse_args(argv)
    raise_nofile_limit()
    params = {
        **DEFAULTS,
        "agents": args.agents,
        "procs": args.procs,
        "steps": args.steps,
        "healthy_for": args.healthy_for,
        "step_timeout": args.step_timeout,
    }
    work = args.work or Path(tempfile.mkdtemp(prefix="margo-bench-rollout-"))
    result = asyncio.run(run_one(sys.modules[__name__], "quic", params, work, "rollout"))
    result["params"] = params
    command = f"margo-bench rollout {' '.join(argv)}".strip()
    write_json(
        args.out / "rollout.json",
        {"command": command, "machine": machine_info(), "result": result},
    )
    write_markdown(args.out / "rollout.md", "margo-bench rollout", [report(result, command)])
    s = result["summary"]
    print(
        f"rollout over {s['devices']} devices: {s['state']} in {s['total_s']:.2f} s, gates"
        f" {s['gates_s']:.2f} s, overhead {s['overhead_s']:.2f} s ({args.out / 'rollout.md'})"
    )
    return 0 if s["state"] == "succeeded" else 1
