"""``margo-bench cluster``: several controllers on one PostgreSQL store, failover and what the
coordination costs, with real controller processes and real QUIC devices.

Theory of operation. One private, durable PostgreSQL server (``tests/pg_server.py``, fsync and
full-page writes on; or ``--dsn``) and one throwaway PKI with ``--devices`` identities. The
controllers are real ``margo-controller`` processes pinned to the first core; the devices are
:mod:`bench.cluster_worker` processes (the transport bench's QUIC devices: real
``AgentSession``, desired-state verification, status reports; given the controller list and
walking it with the agent's own ``ControllerOrder``) pinned to the other cores.

1. **Failover**: controllers A and B on one database; every device is given both addresses
   and starts on A. One apply to every device through A (so the change below is a change).
   Then ``kill -9`` A; ``--push-at`` seconds after the kill a change to every device is
   applied through B. Measured: seconds from the kill until B's API shows every device
   connected with ``controller`` = B's instance (polled every 0.25 s), the same from the
   devices' side (their last session answered by B), how long the devices took to notice the
   dead link (keepalive: ``--keepalive`` interval, then 3 unanswered 2 s probes) and to be
   answered by B after that; pushes lost = devices that did not end holding their newest
   manifest in the store (read from PostgreSQL), target 0.
2. **Coordination cost**: the same ``--cost-devices`` devices against (a) one controller on
   SQLite, (b) one on PostgreSQL, (c) two on PostgreSQL with the devices split evenly (each
   device's order begins with its own; their CPU summed), one after the other in each run.
   Controller CPU (utime+stime from /proc, children included) per handshake (connect every
   device, until the API lists them all connected), per device per pushed change (one apply
   naming every device, until every device's ``installed`` status is acknowledged) and per
   idle device (``--idle`` seconds with every device connected and keeping alive at the
   controller's default 20 s), the last also net of the instances' own idle CPU (measured
   over ``--base`` seconds before any device connects: heartbeats, lease and change polls).
   PostgreSQL's own CPU (postmaster and every backend) is given apart. Target: (c) within 15 % of (b); (b) against (a) is reported.

JSON (every raw figure, parameters, machine) and a markdown table go to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx

from bench.cluster_report import failover_summary, report_blocks, summarize_cost
from bench.fleet import TENANT, Fleet, operator_token, prepare_pki
from bench.fleet_worker import device_name
from bench.processes import cpu_split, stop_process, wait_file
from bench.report_util import CLK_TCK, machine_info, write_report
from bench.scenarios.common import apply
from bench.signing import Signer
from bench.store_throughput import private_server

BIN = Path(sys.executable).parent
CONFIGS = (("sqlite-1", False, 1), ("pg-1", True, 1), ("pg-2", True, 2))


def _log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- CPU from /proc


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from "state" on


def process_cpu(pid: int) -> float:
    """utime+stime of ``pid`` and of its children that ended (cutime+cstime), seconds."""
    f = _stat(pid)
    return sum(int(x) for x in f[11:15]) / CLK_TCK


def tree_cpu(root: int) -> float:
    """``process_cpu(root)`` plus utime+stime of its live children (PostgreSQL's backends)."""
    total = process_cpu(root)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                f = _stat(int(entry.name))
                if int(f[1]) == root:
                    total += (int(f[11]) + int(f[12])) / CLK_TCK
    return total


async def postmaster_pid(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:  # the parent of this connection's backend, read while the backend lives
        return int(_stat(int(await conn.fetchval("SELECT pg_backend_pid()")))[1])
    finally:
        await conn.close()


async def reset_schema(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


async def newest_versions(dsn: str) -> dict[str, int]:
    """Every device's newest manifest version in the store."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT device_id, max(version) AS v FROM manifests WHERE tenant = $1"
            " GROUP BY device_id",
            TENANT,
        )
    finally:
        await conn.close()
    return {r["device_id"]: int(r["v"]) for r in rows}


# --------------------------------------------------------------------------- controllers


class Controller:
    """One ``margo-controller`` process on loopback, pinned to the servers' core."""

    def __init__(self, work: Path, name: str, dsn: str | None, keepalive: float) -> None:
        data = work / name
        data.mkdir(parents=True)
        argv = [
            str(BIN / "margo-controller"),
            "--certs",
            str(work / "certs"),
            "--data",
            str(data),
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--keepalive",
            str(keepalive),
            "--log-level",
            "warning",
            *(["--store", dsn] if dsn else []),
        ]
        with open(data / "controller.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        os.sched_setaffinity(self.proc.pid, cpu_split()[0])
        info = wait_file(data / "controller.json", self.proc, 60)
        self.api: str = info["api"]
        self.quic: str = info["quic"]
        self.instance: str = info["instance"]

    def cpu(self) -> float:
        return process_cpu(self.proc.pid)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)


@contextlib.contextmanager
def controllers(
    work: Path, names: list[str], dsn: str | None, keepalive: float
) -> Iterator[list[Controller]]:
    started: list[Controller] = []
    try:
        for name in names:
            started.append(Controller(work, name, dsn, keepalive))
        yield started
    finally:
        for ctl in started:
            ctl.stop()


def cpu_of(ctls: list[Controller]) -> float:
    return sum(c.cpu() for c in ctls if c.proc.poll() is None)


# --------------------------------------------------------------------------- devices


class ClusterFleet(Fleet):
    """The transport bench's fleet, its devices given a controller list (and ``conn`` events
    collected: ``[device, controller index, time, "up" | "down"]``)."""

    worker_module = "bench.cluster_worker"

    def __init__(self, *args: Any, controllers: str, home: str, **kw: Any) -> None:
        super().__init__("quic", *args, **kw)
        self.controllers = controllers
        self.home = home
        self.conns: list[list[Any]] = []
        self.forwarders: list[asyncio.Future[None]] = []

    def worker_extra(self) -> dict[str, Any]:
        return {"controllers": self.controllers, "home": self.home}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        await super().start(host, port)
        for worker in self.workers:  # before "go": no conn event is sent earlier
            queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            worker.events["conn"] = queue
            self.forwarders.append(asyncio.ensure_future(self._forward_conns(queue)))

    async def _forward_conns(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            self.conns.extend((await queue.get())["items"])

    async def stop(self) -> None:
        await super().stop()
        for f in self.forwarders:
            f.cancel()


def api_client(api: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=api, timeout=120, headers={"Authorization": f"Bearer {token}"}
    )


async def connected_count(api: str, token: str, instance: str | None = None) -> int:
    """Devices the API shows connected (to ``instance`` when given)."""
    async with api_client(api, token) as client:
        r = await client.get("/api/v1/devices")
        r.raise_for_status()
        return sum(
            1
            for d in r.json()["items"]
            if d["connected"] and (instance is None or d["controller"] == instance)
        )


async def wait_connected(
    api: str, token: str, n: int, timeout: float, instance: str | None = None
) -> float | None:
    """Monotonic time the API first showed ``n`` devices connected, or None at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await connected_count(api, token, instance) >= n:
            return time.monotonic()
        await asyncio.sleep(0.25)
    return None


def operator(work: Path, api: str, token: str) -> Any:
    """What ``bench.scenarios.common.apply`` needs of a scenario's context."""
    return SimpleNamespace(
        signer=Signer.for_tenant(work / "certs", TENANT),
        client=lambda: api_client(api, token),
        extra={},
    )


async def wait_all_got(fleet: Fleet, n: int, t0: float, timeout: float) -> float | None:
    """Monotonic time every device's push after ``t0`` had its status acknowledged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        acked = {item[0]: item[3] for item in fleet.got if item[2] > t0}
        if len(acked) >= n:
            return max(acked.values())
        await asyncio.sleep(0.05)
    return None


# --------------------------------------------------------------------------- 1. failover


async def failover(args: argparse.Namespace, work: Path, dsn: str, run: int) -> dict[str, Any]:
    n = args.devices
    token = operator_token(work)
    await reset_schema(dsn)
    with controllers(work, [f"fo{run}-a", f"fo{run}-b"], dsn, args.keepalive) as (a, b):
        fleet = ClusterFleet(
            work / "certs" / TENANT / "devices",
            work,
            f"fo{run}",
            n,
            args.procs,
            controllers=f"{a.quic},{b.quic}",
            home="first",
        )
        try:
            await fleet.start()
            await fleet.connect_all(120 + n / 20)
            on_a = await wait_connected(a.api, token, n, 60, a.instance)
            t0 = await apply(operator(work, a.api, token), [device_name(i) for i in range(n)], "v0")
            if on_a is None or await wait_all_got(fleet, n, t0, 120) is None:
                raise RuntimeError("the fleet did not settle on A before the kill")
            await asyncio.sleep(1.0)
            t_kill = time.monotonic()
            a.kill()
            _log(f"run {run + 1}: killed A; pushes through B at +{args.push_at} s")
            pushes = asyncio.ensure_future(push_during(args, work, b.api, token, n, t_kill))
            all_on_b = await wait_connected(b.api, token, n, args.failover_timeout, b.instance)
            pushed = await pushes
            held = await wait_newest(fleet, dsn, n, max(30.0, args.failover_timeout / 2))
            conns = list(fleet.conns)
        finally:
            await fleet.stop()
    return failover_summary(n, t_kill, all_on_b, conns, pushed, held) | {
        "keepalive_s": args.keepalive
    }


async def push_during(
    args: argparse.Namespace, work: Path, api: str, token: str, n: int, t_kill: float
) -> list[dict[str, float]]:
    out = []
    ctx = operator(work, api, token)
    for k, at in enumerate(args.push_at):
        await asyncio.sleep(max(0.0, t_kill + at - time.monotonic()))
        t0 = await apply(ctx, [device_name(i) for i in range(n)], f"failover-{k}")
        out.append({"at_s": t0 - t_kill, "apply_s": ctx.extra["apply_seconds"]})
    return out


async def wait_newest(fleet: Fleet, dsn: str, n: int, timeout: float) -> dict[str, Any]:
    """Wait until every device holds its newest manifest in the store (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        newest = await newest_versions(dsn)
        held: dict[str, int] = {}
        for item in fleet.got:
            name = device_name(item[0])
            held[name] = max(held.get(name, 0), item[1])
        got = sum(1 for d, v in newest.items() if held.get(d) == v)
        if got >= n or time.monotonic() > deadline:
            return {"devices_with_newest": got, "newest_known": len(newest)}
        await asyncio.sleep(0.25)


# --------------------------------------------------------------------------- 2. coordination cost


async def cost_one(
    args: argparse.Namespace, work: Path, dsn: str, pg_pid: int, name: str, pg: bool, count: int
) -> dict[str, Any]:
    n = args.cost_devices
    token = operator_token(work)
    if pg:
        await reset_schema(dsn)
    names = [f"{name}-{k}-{time.monotonic_ns()}" for k in range(count)]
    with controllers(work, names, dsn if pg else None, 20.0) as ctls:
        fleet = ClusterFleet(
            work / "certs" / TENANT / "devices",
            work,
            names[0],
            n,
            args.procs,
            controllers=",".join(c.quic for c in ctls),
            home="spread",
        )
        marks: list[tuple[str, float, float, float]] = []

        def mark(label: str) -> None:
            marks.append((label, time.monotonic(), cpu_of(ctls), tree_cpu(pg_pid)))

        try:
            await fleet.start()
            mark("base")
            await asyncio.sleep(args.base)  # the instances' own idle CPU, no device yet
            mark("start")
            await fleet.connect_all(120 + n / 20)
            if await wait_connected(ctls[0].api, token, n, 60) is None:
                raise RuntimeError(f"{name}: the API does not list {n} devices connected")
            mark("connected")
            await asyncio.sleep(2.0)
            mark("push")
            t0 = await apply(
                operator(work, ctls[0].api, token), [device_name(i) for i in range(n)], "c"
            )
            if await wait_all_got(fleet, n, t0, 120) is None:
                raise RuntimeError(f"{name}: not every device acknowledged the change")
            await asyncio.sleep(0.5)
            mark("pushed")
            await asyncio.sleep(2.0)
            mark("idle")
            await asyncio.sleep(args.idle)
            mark("idled")
            spread = [
                sum(1 for c in fleet.conns if c[1] == k and c[3] == "up") for k in range(count)
            ]
        finally:
            await fleet.stop()
    return {
        "config": name,
        "controllers": count,
        "devices": n,
        "sessions_per_controller": spread,
        "marks": marks,
    }


async def cost(args: argparse.Namespace, work: Path, dsn: str, run: int) -> list[dict[str, Any]]:
    pg_pid = await postmaster_pid(dsn)
    order = list(CONFIGS[run % 3 :] + CONFIGS[: run % 3])  # who goes first rotates per run
    results = []
    for name, pg, count in order:
        _log(f"run {run + 1}: cost {name} ...")
        results.append(await cost_one(args, work, dsn, pg_pid, name, pg, count))
    return [summarize_cost(r) for r in results]


# --------------------------------------------------------------------------- main


async def run_all(args: argparse.Namespace, work: Path, dsn: str) -> dict[str, Any]:
    data: dict[str, Any] = {"failover": [], "cost": []}
    n = max(args.devices if "failover" in args.parts else 0, args.cost_devices)
    _log(f"issuing {n} device identities ...")
    await asyncio.to_thread(prepare_pki, work, n)
    for run in range(args.runs):
        if "failover" in args.parts:
            _log(f"run {run + 1}: failover, {args.devices} devices ...")
            data["failover"].append(await failover(args, work, dsn, run))
        if "cost" in args.parts:
            data["cost"].append(await cost(args, work, dsn, run))
    return data


def seconds_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="margo-bench cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="an empty PostgreSQL database (default: a private server)")
    p.add_argument("--parts", default="failover,cost", help="failover, cost or both")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--devices", type=int, default=1000, help="devices in the failover")
    p.add_argument("--keepalive", type=float, default=5.0, help="failover: --keepalive, s")
    p.add_argument("--push-at", type=seconds_list, default=[0.5], help="s after the kill")
    p.add_argument("--failover-timeout", type=float, default=60.0)
    p.add_argument("--cost-devices", type=int, default=500)
    p.add_argument("--idle", type=float, default=30.0, help="idle window, seconds")
    p.add_argument("--base", type=float, default=10.0, help="idle s before any device")
    p.add_argument("--procs", type=int, default=2, help="device worker processes")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",")]
    machine = machine_info(("asyncpg", "aioquic", "anyio"))
    with tempfile.TemporaryDirectory(prefix="margo-cluster-") as tmp:
        with contextlib.ExitStack() as stack:
            dsn = args.dsn or stack.enter_context(private_server())
            data = asyncio.run(run_all(args, Path(tmp), dsn))
    data.update(machine=machine, parameters=vars(args) | {"out": str(args.out)})
    blocks = report_blocks(data)
    json_path, md_path = write_report(
        args.out, "cluster", data, "Several controllers: failover and coordination cost", blocks
    )
    print("\n".join(blocks))
    _log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
