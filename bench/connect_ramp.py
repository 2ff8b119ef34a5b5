"""``margo-bench connect``'s agents: start the :mod:`bench.simfleet` worker processes, ramp
them (``go`` to all at once, follow the progress until every agent is connected or gave up) and
ask them how many connections are still alive."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.processes import Worker
from bench.report_util import cpu_percent, downsample, sample_process


async def start_workers(
    cfg: dict[str, Any], agents: int, procs: int, log_dir: Path, cpus: set[int]
) -> list[Worker]:
    workers = []
    first = 0
    for i in range(procs):
        count = agents // procs + (1 if i < agents % procs else 0)
        log = open(log_dir / f"worker-{cfg['mode']}-{i}.log", "ab")  # noqa: SIM115 - child owns it
        profile = cfg.get("profile")
        launcher = ["-m", "cProfile", "-o", f"{profile}.{cfg['mode']}.{i}"] if profile else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *launcher,
            "-m",
            "bench.simfleet",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            limit=1 << 24,
        )
        log.close()
        worker = Worker(proc, i)
        await worker.send(json.dumps({**cfg, "first": first, "count": count, "cpus": sorted(cpus)}))
        workers.append(worker)
        first += count
    prepare_timeout = 60 + agents / procs * 0.01
    for worker in workers:
        worker.ready = await worker.wait("ready", prepare_timeout)
    return workers


async def ramp(
    workers: list[Worker], agents: int, label: str, server_pid: int, timeout: float
) -> dict[str, Any]:
    """Send ``go`` to every worker and follow the ramp until every agent is connected or gave up."""
    before = {w.index: sample_process(w.proc.pid) for w in workers}
    server_before = sample_process(server_pid)
    udp_before = udp_counters()
    t_go = time.monotonic()
    for worker in workers:
        await worker.send("go")
    tty = sys.stderr.isatty()
    last_print = 0.0
    pending = {w.index: asyncio.ensure_future(w.wait("ramped", timeout)) for w in workers}
    try:
        while not all(p.done() for p in pending.values()):
            await asyncio.sleep(0.25)
            now = time.monotonic()
            if now - last_print >= (0.5 if tty else 5.0):
                last_print = now
                connected = sum(w.connected for w in workers)
                failures = sum(w.failures for w in workers)
                elapsed = now - t_go
                line = (
                    f"{label}: {connected:,}/{agents:,} connected, {connected / elapsed:,.0f}/s, "
                    f"{failures} failed attempts, {elapsed:.1f} s"
                )
                print(
                    ("\r" + line + "   ") if tty else line,
                    end="" if tty else "\n",
                    file=sys.stderr,
                    flush=True,
                )
        results = [p.result() for p in pending.values()]
    finally:
        for p in pending.values():
            p.cancel()
    t_end = time.monotonic()
    server_after = sample_process(server_pid)
    udp_after = udp_counters()
    worker_after = {w.index: sample_process(w.proc.pid) for w in workers}
    worker_cpu = [cpu_percent(before[i], after, t_end - t_go) for i, after in worker_after.items()]
    times = sorted(t - t_go for r in results for t in r["times"])
    latencies = sorted(x for r in results for x in r["latencies"])
    connected = len(times)
    ramp_s = times[-1] if times else None
    if tty:
        print(file=sys.stderr)
    print(
        f"{label}: {connected:,}/{agents:,} connected in {ramp_s or 0:.2f} s "
        f"({connected / ramp_s if ramp_s else 0:,.1f}/s)",
        file=sys.stderr,
        flush=True,
    )
    # steady-state rate: the middle 80 % of the ramp, free of start-up and stragglers
    mid_rate = None
    if connected >= 10:
        lo, hi = times[connected // 10], times[(9 * connected) // 10]
        if hi > lo:
            mid_rate = ((9 * connected) // 10 - connected // 10) / (hi - lo)
    return {
        "connected": connected,
        "gave_up": sum(r["gave_up"] for r in results),
        "failed_attempts": sum(r["failures"] for r in results),
        "failure_samples": sorted({s for r in results for s in r.get("failure_samples", [])})[:5],
        "ramp_seconds": ramp_s,
        "handshake_rate": connected / ramp_s if ramp_s else None,
        "handshake_rate_middle_80pct": mid_rate,
        "handshake_latency_ms": {
            f"p{q}": 1000 * latencies[min(len(latencies) - 1, len(latencies) * q // 100)]
            for q in (50, 90, 99)
        }
        if latencies
        else {},
        # loopback: every datagram sent is received once; other traffic on the host adds noise
        "udp_datagrams_per_handshake": (udp_after["InDatagrams"] - udp_before["InDatagrams"])
        / max(connected, 1)
        if udp_before and udp_after
        else None,
        # datagrams the kernel dropped for a full receive buffer (host-wide): each one costs a
        # retransmission after a probe timeout, which shows in the latency tail
        "udp_receive_buffer_drops": udp_after["RcvbufErrors"] - udp_before["RcvbufErrors"]
        if udp_before and udp_after
        else None,
        "server_cpu_percent_during_ramp": cpu_percent(server_before, server_after, t_end - t_go),
        "server_cpu_ms_per_handshake": 1000
        * (server_after.cpu_s - server_before.cpu_s)
        / max(connected, 1),
        "worker_cpu_percent_during_ramp": worker_cpu,
        "worker_cpu_ms_per_handshake": 1000
        * sum(after.cpu_s - before[i].cpu_s for i, after in worker_after.items())
        / max(connected, 1),
        "timeline": _timeline(times),
        "_times": times,
    }


def udp_counters() -> dict[str, int] | None:
    """The host's UDP counters (/proc/net/snmp): InDatagrams, RcvbufErrors, ..."""
    try:
        names, values = [
            line.split()[1:]
            for line in Path("/proc/net/snmp").read_text().splitlines()
            if line.startswith("Udp:")
        ][:2]
        return {name: int(value) for name, value in zip(names, values, strict=True)}
    except (OSError, ValueError):
        return None


def _timeline(times: list[float]) -> list[list[float]]:
    return [[round(t, 4), n] for n, t in downsample([(i + 1, t) for i, t in enumerate(times)], 400)]


async def worker_status(workers: list[Worker]) -> dict[str, int]:
    for worker in workers:
        await worker.send("status")
    replies = [await w.wait("status", 30) for w in workers]
    return {"alive": sum(r["alive"] for r in replies), "lost": sum(r["lost"] for r in replies)}
