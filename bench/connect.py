"""``margo-bench connect``: how many agents one controller process holds, and what each costs.

Theory of operation. One invocation makes a throwaway PKI (one tenant; the device certificates
are issued in memory by the workers), then for each run:

1. **ours**: starts a real ``margo-controller`` pinned to its own core (CPU 0), then ``--procs``
   worker processes (:mod:`bench.simfleet`, pinned to the other cores) holding ``--agents``
   simulated agents between them, on the agent's QUIC stack (``--quic-stack``, default qh3).
   After every worker issued its certificates, all of them get ``go`` at once; each keeps at
   most ``--concurrency`` handshakes in flight. An agent counts as connected when its hello
   was answered (full mutual-TLS handshake + hello + HelloAck).
   - handshake rate = connected agents / (last agent's ready time - go);
   - RSS per agent = (controller VmRSS with N connected - VmRSS before any) / N;
   - idle CPU = controller utime+stime over ``--idle-seconds`` with every agent connected and
     keeping alive (controller default: ping every 20 s), as % of one core;
   - finally the operator API (``GET /api/v1/devices``, the tenant's bearer token) must list N
     connected devices, and the workers must still hold N live connections.
2. **bare**: the same ramp against a plain aioquic server (:mod:`bench.bare_quic`: server-only
   TLS, same P-256 certificate, same transport parameters) from the same number of worker
   processes with the same concurrency; its rate is the reference: ratio = ours / bare.

Runs alternate which of the two goes first. JSON (every raw figure, parameters, machine), a
markdown table and a PNG of connected agents over time during the ramp go to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.connect_ramp import ramp, start_workers, udp_counters, worker_status
from bench.connect_report import TARGETS, markdown_blocks, plot, summarize
from bench.processes import Worker, cpu_split, stop_process, wait_file
from bench.report_util import (
    cpu_percent,
    machine_info,
    raise_nofile_limit,
    sample_process,
    write_report,
)
from margo_stream.transport.quic_stack import DEFAULT_QUIC_STACK, QUIC_STACKS

SCENARIO = "connect"
TENANT = "bench"
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- the two sides


async def measure_ours(
    args: argparse.Namespace, work: Path, run: int, cpus: tuple[set[int], set[int]]
) -> dict[str, Any]:
    certs = work / "certs"
    data = work / f"data-{run}"
    data.mkdir()
    launcher = [str(BIN / "margo-controller")]
    if args.profile_controller:  # cProfile writes its stats when the controller exits on SIGTERM
        launcher = [
            sys.executable,
            "-m",
            "cProfile",
            "-o",
            f"{args.profile_controller}.{run + 1}",
            "-m",
            "controller.cli",
        ]
    argv = [
        *launcher,
        "--certs",
        str(certs),
        "--data",
        str(data),
        "--listen",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        "--keepalive",
        str(args.keepalive),
        "--idle-timeout",
        str(args.idle_timeout),
        "--log-level",
        args.controller_log_level,
        "--log-format",
        "json",
    ]
    with open(data / "controller.log", "ab") as log:
        ctl = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[Worker] = []
    try:
        os.sched_setaffinity(ctl.pid, cpus[0])
        info = wait_file(data / "controller.json", ctl, 60)
        port = int(info["quic"].rsplit(":", 1)[1])
        cfg = {
            "mode": "margo",
            "host": "127.0.0.1",
            "port": port,
            "certs": str(certs),
            "tenant": TENANT,
            "template": str(certs / TENANT / "devices" / "bench-template"),
            "server_name": TENANT,  # the controller presents the tenant's certificate
            "idle_timeout": args.idle_timeout,
            "concurrency": args.concurrency,
            "timeout": args.handshake_timeout,
            "profile": args.profile_workers,
            "quic_stack": args.quic_stack,
        }
        workers = await start_workers(cfg, args.agents, args.procs, work, cpus[1])
        reload_allow_list(work, info["api"])  # the workers' devices, before the ramp
        await asyncio.sleep(1.0)
        base = sample_process(ctl.pid)
        result = await ramp(
            workers, args.agents, f"run {run + 1} margo-stream", ctl.pid, args.ramp_timeout
        )
        await asyncio.sleep(args.settle)
        connected_sample = sample_process(ctl.pid)
        t0 = time.monotonic()
        idle_before = sample_process(ctl.pid)
        udp_before = udp_counters()
        if args.idle_seconds > 0:
            print(
                f"run {run + 1} margo-stream: idle window {args.idle_seconds:.0f} s with "
                f"{result['connected']:,} agents keeping alive",
                file=sys.stderr,
                flush=True,
            )
        await asyncio.sleep(args.idle_seconds)
        idle_after = sample_process(ctl.pid)
        udp_after = udp_counters()
        window = time.monotonic() - t0
        status = await worker_status(workers)
        n = max(result["connected"], 1)
        rss_connected = max(connected_sample.rss_kb, idle_after.rss_kb)
        api = await asyncio.to_thread(api_devices, work, info["api"])
        result.update(
            {
                "controller_pid": ctl.pid,
                "rss_before_kb": base.rss_kb,
                "rss_connected_kb": connected_sample.rss_kb,
                "rss_after_idle_kb": idle_after.rss_kb,
                "rss_per_agent_kb": (rss_connected - base.rss_kb) / n,
                "idle_window_seconds": window,
                "idle_cpu_seconds": idle_after.cpu_s - idle_before.cpu_s,
                "idle_cpu_percent": cpu_percent(idle_before, idle_after, window),
                # both directions (loopback: each datagram received once), per agent-minute
                "idle_datagrams_per_agent_minute": (
                    (udp_after["InDatagrams"] - udp_before["InDatagrams"]) * 60 / window / n
                    if udp_before and udp_after
                    else None
                ),
                "alive_after_idle": status["alive"],
                "lost_during_hold": status["lost"],
                "api_devices_listed": api["listed"],
                "api_devices_connected": api["connected"],
                "api_seconds": api["seconds"],
                "worker_prepare_seconds": [w.ready["prepare_s"] for w in workers if w.ready],
            }
        )
        return result
    finally:
        for worker in workers:
            await worker.stop()
        stop_process(ctl)
        if ctl.returncode not in (0, None):
            print(
                f"controller exited with {ctl.returncode}; log: {data / 'controller.log'}",
                file=sys.stderr,
            )


def reload_allow_list(work: Path, api: str) -> None:
    """The controller imports the allow files the workers wrote for their devices."""
    import httpx

    token = (work / "certs" / TENANT / "operator.token").read_text().strip()
    r = httpx.post(
        f"{api}/api/v1/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=300
    )
    r.raise_for_status()


def api_devices(work: Path, api: str) -> dict[str, Any]:
    import httpx

    token = (work / "certs" / TENANT / "operator.token").read_text().strip()
    t0 = time.monotonic()
    r = httpx.get(
        f"{api}/api/v1/devices", headers={"Authorization": f"Bearer {token}"}, timeout=120
    )
    r.raise_for_status()
    items = [d for d in r.json()["items"] if d["id"].startswith("sim-")]
    return {
        "listed": len(items),
        "connected": sum(1 for d in items if d["connected"]),
        "seconds": time.monotonic() - t0,
    }


async def measure_bare(
    args: argparse.Namespace, work: Path, run: int, cpus: tuple[set[int], set[int]]
) -> dict[str, Any]:
    cdir = work / "certs" / "controller"
    launcher = (
        ["-m", "cProfile", "-o", f"{args.profile_controller}.bare.{run + 1}"]
        if args.profile_controller
        else []
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        *launcher,
        "-m",
        "bench.bare_quic",
        "--cert",
        str(cdir / "cert.pem"),
        "--key",
        str(cdir / "key.pem"),
        "--idle-timeout",
        str(args.idle_timeout),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    workers: list[Worker] = []
    try:
        os.sched_setaffinity(server.pid, cpus[0])
        assert server.stdout is not None
        line = await asyncio.wait_for(server.stdout.readline(), 30)
        port = json.loads(line)["port"]
        cfg = {
            "mode": "bare",
            "host": "127.0.0.1",
            "port": port,
            "cafile": str(cdir / "ca.pem"),
            "server_name": "localhost",
            "idle_timeout": args.idle_timeout,
            "concurrency": args.concurrency,
            "timeout": args.handshake_timeout,
            "profile": args.profile_workers,
        }
        workers = await start_workers(cfg, args.agents, args.procs, work, cpus[1])
        await asyncio.sleep(1.0)
        base = sample_process(server.pid)
        result = await ramp(
            workers, args.agents, f"run {run + 1} bare aioquic", server.pid, args.ramp_timeout
        )
        await asyncio.sleep(args.settle)
        held = sample_process(server.pid)
        result.update(
            {
                "server_pid": server.pid,
                "rss_before_kb": base.rss_kb,
                "rss_connected_kb": held.rss_kb,
                "rss_per_connection_kb": (held.rss_kb - base.rss_kb) / max(result["connected"], 1),
            }
        )
        return result
    finally:
        for worker in workers:
            await worker.stop()
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(server.wait(), 30)
            except TimeoutError:
                server.kill()
                await server.wait()


# --------------------------------------------------------------------------- runs and report


def prepare_pki(work: Path) -> None:
    from margo_stream.identity.pki import init_pki, issue_device

    certs = work / "certs"
    init_pki(certs, [TENANT], ["localhost", "127.0.0.1"])
    issue_device(certs, TENANT, "bench-template")  # the client configuration's template


async def run_all(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    cpus = cpu_split()
    runs = []
    for run in range(args.runs):
        sides: dict[str, Any] = {}
        order = ("ours", "bare") if run % 2 == 0 else ("bare", "ours")
        for side in order:
            if side == "bare" and args.no_bare:
                continue
            measure = measure_ours if side == "ours" else measure_bare
            sides[side] = await measure(args, work, run, cpus)
        ours, bare = sides.get("ours", {}), sides.get("bare", {})
        ratio = (
            ours["handshake_rate"] / bare["handshake_rate"]
            if ours.get("handshake_rate") and bare.get("handshake_rate")
            else None
        )
        runs.append(
            {"run": run + 1, "order": list(order), "ours": ours, "bare": bare, "rate_ratio": ratio}
        )
        if ratio is not None:
            print(f"run {run + 1}: ours/bare handshake rate = {ratio:.2f}", file=sys.stderr)
    return runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="margo-bench connect", description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=1000, help="simulated agents (N)")
    p.add_argument(
        "--procs",
        type=int,
        default=max(1, len(cpu_split()[1])),
        help="worker processes for the agents (default: one per client core)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="report directory")
    p.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU window")
    p.add_argument("--keepalive", type=float, default=20.0, help="controller keepalive, seconds")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="QUIC idle timeout, seconds")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight per worker")
    p.add_argument("--handshake-timeout", type=float, default=20.0)
    p.add_argument(
        "--ramp-timeout",
        type=float,
        default=None,
        help="seconds to wait for the ramp (default 60 + N/20)",
    )
    p.add_argument("--settle", type=float, default=2.0, help="pause after the ramp, seconds")
    p.add_argument("--controller-log-level", default="info")
    p.add_argument(
        "--profile-controller",
        metavar="PATH",
        help="run the controller (and the bare server) under cProfile, stats to "
        "PATH.<run> (PATH.bare.<run>)",
    )
    p.add_argument(
        "--profile-workers",
        metavar="PATH",
        help="run the workers under cProfile, stats to PATH.<mode>.<worker>",
    )
    p.add_argument(
        "--quic-stack",
        choices=QUIC_STACKS,
        default=DEFAULT_QUIC_STACK,
        help=f"the simulated agents' QUIC stack, as margo-agent's (default {DEFAULT_QUIC_STACK})",
    )
    p.add_argument("--no-bare", action="store_true", help="skip the bare-aioquic reference")
    p.add_argument("--keep", action="store_true", help="keep the work directory (PKI, logs)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.agents < 1 or args.procs < 1 or args.runs < 1 or args.concurrency < 1:
        print(
            "margo-bench connect: --agents, --procs, --runs and --concurrency must be >= 1",
            file=sys.stderr,
        )
        return 2
    args.procs = min(args.procs, args.agents)
    if args.ramp_timeout is None:
        args.ramp_timeout = 60 + args.agents / 20
    nofile = raise_nofile_limit()
    if args.agents // args.procs + 64 > nofile:
        print(
            f"margo-bench connect: {args.agents // args.procs} agents per worker need more "
            f"than RLIMIT_NOFILE {nofile}; use more --procs",
            file=sys.stderr,
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="margo-bench-connect-"))
    server_cpus, client_cpus = cpu_split()
    try:
        print(f"connect: PKI in {work}", file=sys.stderr)
        prepare_pki(work)
        runs = asyncio.run(run_all(args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for r in runs:
        for side in ("ours", "bare"):
            r.get(side, {}).pop("_times", None)
    report: dict[str, Any] = {
        "scenario": SCENARIO,
        "command": "margo-bench connect " + " ".join(argv),
        "params": {
            "agents": args.agents,
            "procs": args.procs,
            "concurrency": args.concurrency,
            "idle_seconds": args.idle_seconds,
            "keepalive": args.keepalive,
            "idle_timeout": args.idle_timeout,
            "quic_stack": args.quic_stack,
            "runs": args.runs,
            "controller_log_level": args.controller_log_level,
            "server_cpus": sorted(server_cpus),
            "client_cpus": sorted(client_cpus),
            "rlimit_nofile": nofile,
        },
        "machine": machine_info(),
        "targets": TARGETS,
        "runs": runs,
    }
    report["summary"] = summarize(runs, args.agents)
    json_path, md_path = write_report(
        args.out, SCENARIO, report, "margo-bench connect", markdown_blocks(report)
    )
    png = plot(report, args.out / f"{SCENARIO}-ramp.png")
    print(md_path.read_text(), file=sys.stderr)
    print(f"wrote {json_path}, {md_path}, {png}", file=sys.stderr)
    return 0 if report["summary"]["all_agents_held"] else 1
