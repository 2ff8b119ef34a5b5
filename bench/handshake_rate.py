"""``margo-bench handshake-rate``: what ``--quic-retry always`` costs the controller in
handshakes against ``--quic-retry never``, measured in the same run.

Theory of operation. One invocation makes a throwaway PKI (one tenant, ``--concurrency``
device identities on the allow-list) and starts two real ``margo-controller`` processes on the
server core (CPU 0 where there are two or more): one with ``--quic-retry always``, one with
``--quic-retry never``. This process is the client, pinned to the other cores, on uvloop: it
drives full mutual-TLS handshakes with the agent's own client code
(``quic_client.connect``, a device certificate, the tenant's server name and CA, as agents
do), at most ``--concurrency`` in flight; each connection sends its hello and is closed once
the controller answered it (so the controller completed the handshake and checked the
identity: a client that closes at its own handshake completion leaves the server's half
open). With ``always`` every handshake first gets a Retry and repeats its Initial with
the token: one more round trip, a token sealed and opened, a Retry packet built and checked.

Each round drives ``--handshakes`` against each controller in turn (the order alternates by
round, after one warm-up round that is not counted) and records per controller:

- handshakes/s: completed handshakes / wall-clock seconds of the round (what a client fleet
  sees; on a 2-core machine the client core is usually as busy as the server's);
- server CPU per handshake: the controller's utime+stime over the round / completed
  handshakes, and its inverse, handshakes per server CPU-second (what one controller core
  can take, whoever the bottleneck was);
- client CPU per handshake (this process): a client that gets a Retry builds its Initial
  twice, and on a 2-core machine the single client core often sets the wall-clock rate.

Reported: the medians over rounds and the ratios always/never. JSON (every round) and a
markdown table go to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aioquic.quic.configuration import QuicConfiguration

from bench.processes import cpu_split, stop_process, wait_file
from bench.report_util import (
    machine_info,
    machine_line,
    markdown_table,
    median,
    raise_nofile_limit,
    sample_process,
    write_report,
)
from margo_stream.identity.pki import init_pki, issue_device
from margo_stream.protocol import messages as m
from margo_stream.transport.connection import Connection
from margo_stream.transport.quic_client import client_configuration, connect

SCENARIO = "handshake-rate"
TENANT = "bench"
MODES = ("always", "never")
BIN = Path(sys.executable).parent


def device_id(index: int) -> str:
    return f"hs-{index:03d}"


def start_controller(work: Path, mode: str, cpus: set[int]) -> tuple[subprocess.Popen[bytes], int]:
    data = work / f"data-{mode}"
    data.mkdir()
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
        "--quic-retry",
        mode,
        "--log-level",
        "warning",
    ]
    with open(data / "controller.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    os.sched_setaffinity(proc.pid, cpus)
    info = wait_file(data / "controller.json", proc, 60)
    return proc, int(info["quic"].rsplit(":", 1)[1])


async def drive(
    port: int, confs: list[QuicConfiguration], count: int, timeout: float
) -> dict[str, Any]:
    """``count`` handshakes, ``len(confs)`` in flight (one identity each), each followed by
    the hello the controller answers once it checked the identity; then closed."""
    loop = asyncio.get_running_loop()
    todo = iter(range(count))
    done = failed = 0

    async def connected(conn: Connection, device: str) -> None:
        await conn.wait_handshake()
        control = conn.open_stream()
        control.send(
            m.Hello(device_id=device, agent_version="bench", capabilities=m.Capabilities(id=device))
        )
        reply = await control.receive()
        if not isinstance(reply, m.HelloAck):
            raise RuntimeError(f"the controller answered the hello with {reply!r}")

    async def slot(index: int, conf: QuicConfiguration) -> None:
        nonlocal done, failed
        for _ in todo:
            conn, transport = await connect("127.0.0.1", port, conf)
            try:
                # in this task: a task of its own (wait_for) could start after the handshake
                # completed, and Connection.wait_handshake would then wait for nothing
                async with asyncio.timeout(timeout):
                    await connected(conn, device_id(index))
                done += 1
            except Exception:  # noqa: BLE001 - counted, the round goes on
                failed += 1
            finally:
                conn.close()
                transport.close()

    t0 = loop.time()
    await asyncio.gather(*(slot(i, conf) for i, conf in enumerate(confs)))
    return {"completed": done, "failed": failed, "seconds": loop.time() - t0}


async def measure(
    args: argparse.Namespace, confs: list[QuicConfiguration], servers: dict[str, Any]
) -> list[dict[str, Any]]:
    for mode in MODES:  # warm-up: caches, the controllers' first collector passes
        await drive(servers[mode]["port"], confs, max(50, args.handshakes // 5), args.timeout)
    rounds = []
    for r in range(args.rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        row: dict[str, Any] = {"round": r + 1, "order": list(order)}
        for mode in order:
            await asyncio.sleep(0.5)  # the last round's closes drained
            pid = servers[mode]["pid"]
            before, client_before = sample_process(pid), time.process_time()
            result = await drive(servers[mode]["port"], confs, args.handshakes, args.timeout)
            cpu = sample_process(pid).cpu_s - before.cpu_s
            client_cpu = time.process_time() - client_before
            n = max(result["completed"], 1)
            row[mode] = {
                **result,
                "rate": result["completed"] / result["seconds"],
                "server_cpu_ms": 1000.0 * cpu / n,
                "per_cpu_second": n / cpu if cpu > 0 else None,
                "client_cpu_ms": 1000.0 * client_cpu / n,
            }
            print(
                f"round {r + 1} {mode:>6}: {row[mode]['rate']:7.1f} handshakes/s, "
                f"server {row[mode]['server_cpu_ms']:.2f} ms CPU each, "
                f"client {row[mode]['client_cpu_ms']:.2f} ms, {result['failed']} failed",
                file=sys.stderr,
                flush=True,
            )
        rounds.append(row)
    return rounds


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        out[mode] = {
            key: median(r[mode][key] for r in rounds)
            for key in ("rate", "server_cpu_ms", "per_cpu_second", "client_cpu_ms")
        }
        out[mode]["failed"] = sum(r[mode]["failed"] for r in rounds)
    a, n = out["always"], out["never"]
    out["ratio_rate"] = a["rate"] / n["rate"] if n["rate"] else None
    out["ratio_capacity"] = (
        a["per_cpu_second"] / n["per_cpu_second"]
        if a["per_cpu_second"] and n["per_cpu_second"]
        else None
    )
    return out


def report(args: argparse.Namespace, rounds: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    s = summarize(rounds)
    rows = [
        [
            mode,
            s[mode]["rate"],
            s[mode]["server_cpu_ms"],
            s[mode]["per_cpu_second"],
            s[mode]["client_cpu_ms"],
            s[mode]["failed"],
        ]
        for mode in MODES
    ]
    headers = ["--quic-retry", "handshakes/s", "server CPU ms each", "per server CPU-s"]
    table = markdown_table([*headers, "client CPU ms each", "failed"], rows)
    caption = (
        f"Medians of {args.rounds} rounds of {args.handshakes:,} mutual-TLS handshakes, "
        f"{args.concurrency} in flight; ratio always/never: {s['ratio_rate']:.3f} "
        f"(handshakes/s), {s['ratio_capacity']:.3f} (per server CPU-second). "
        f"{machine_line(machine)}."
    )
    write_report(
        args.out,
        SCENARIO,
        {
            "params": vars(args) | {"out": str(args.out)},
            "machine": machine,
            "rounds": rounds,
            "summary": s,
        },
        "QUIC Retry: handshake rate, always vs never",
        [table, caption],
    )
    return table + "\n" + caption


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="margo-bench handshake-rate",
        description="Handshake rate of --quic-retry always against never, in one run.",
    )
    p.add_argument("--handshakes", type=int, default=400, help="per controller per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=16, help="handshakes in flight")
    p.add_argument("--timeout", type=float, default=10.0, help="one handshake, seconds")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="report directory")
    args = p.parse_args(argv)
    raise_nofile_limit()
    server_cpus, client_cpus = cpu_split()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="margo-bench-hs-") as tmp:
        work = Path(tmp)
        certs = work / "certs"
        init_pki(certs, [TENANT], ["localhost", "127.0.0.1"])
        confs = []
        for i in range(args.concurrency):
            ident = issue_device(certs, TENANT, device_id(i))
            confs.append(
                client_configuration(
                    str(ident / "cert.pem"),
                    str(ident / "key.pem"),
                    str(ident / "ca.pem"),
                    server_name=TENANT,
                )
            )
        procs: list[subprocess.Popen[bytes]] = []
        try:
            servers = {}
            for mode in MODES:
                proc, port = start_controller(work, mode, server_cpus)
                procs.append(proc)
                servers[mode] = {"pid": proc.pid, "port": port}
            os.sched_setaffinity(0, client_cpus)
            import uvloop

            started = time.monotonic()
            rounds = uvloop.run(measure(args, confs, servers))
            print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
        finally:
            for proc in procs:
                stop_process(proc)
    print(report(args, rounds, machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
