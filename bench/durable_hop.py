"""``margo-bench durable-hop``: what handing a durable write to a thread costs the event loop.

Every push an agent applies makes its trust state durable (a write and an ``fdatasync``) on a
thread before it answers. This measures, per write, the process's CPU time and the wall time
until the writer is back on the loop, for:

- ``pool``: ``margo_stream.durable_io.run_durable`` (kept threads, one queue, the loop's own
  future set by one ``call_soon_threadsafe``);
- ``executor``: ``loop.run_in_executor`` on a ``ThreadPoolExecutor`` of the same size (the
  pool's design before, two futures chained across threads);
- ``inline``: the write on the loop itself (no hop: the floor, and what a hop must beat on
  wall time when writers overlap, since the loop is blocked meanwhile).

Each writer does a little Python work (about 100 us, as a push's verification would), then
its write: a JSON record of 300 bytes written in place into a file of its own and
``fdatasync``-ed, on real files under ``--dir`` (default: a temporary directory). ``--writers
1`` is a real agent (one push at a time); ``--writers 500`` is a simulated fleet worker
(writes overlapping). The modes alternate within each run; medians over ``--runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvloop

from bench.report_util import machine_info, machine_line, markdown_table, median, write_report
from margo_stream.durable_io import DURABLE_THREADS, run_durable

SCENARIO = "durable-hop"
MODES = ("pool", "executor", "inline")


def _work() -> int:
    total = 0
    for k in range(3000):  # about 100 us of Python
        total += k
    return total


async def _one_mode(mode: str, fds: list[int], writes: int, executor: ThreadPoolExecutor) -> dict:
    loop = asyncio.get_running_loop()
    record = json.dumps({"version": 1, "digests": ["sha256:" + "0" * 64] * 3}).encode()

    def write(fd: int) -> None:
        os.pwrite(fd, record, 0)
        os.fdatasync(fd)

    async def writer(fd: int) -> None:
        for _ in range(writes):
            _work()
            if mode == "pool":
                await run_durable(write, fd)
            elif mode == "executor":
                await loop.run_in_executor(executor, write, fd)
            else:
                write(fd)
            await asyncio.sleep(0)

    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(writer(fd) for fd in fds))
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    n = len(fds) * writes
    return {"mode": mode, "writes": n, "cpu_us": 1e6 * cpu / n, "wall_us": 1e6 * wall / n}


def _run(modes: list[str], fds: list[int], writes: int) -> list[dict]:
    with ThreadPoolExecutor(DURABLE_THREADS, thread_name_prefix="bench-executor") as executor:

        async def all_modes() -> list[dict]:
            return [await _one_mode(mode, fds, writes, executor) for mode in modes]

        return uvloop.run(all_modes())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"margo-bench {SCENARIO}", description=__doc__.split("\n")[0])
    p.add_argument("--writers", type=int, default=1, help="writers at once (default 1: an agent)")
    p.add_argument("--writes", type=int, default=2000, help="writes per writer and mode")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dir", type=Path, help="where the files go (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=Path("bench-results") / SCENARIO)
    args = p.parse_args(argv)
    if args.writers < 1 or args.writes < 1 or args.runs < 1:
        p.error("--writers, --writes and --runs must be at least 1")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="margo-durable-hop-") as tmp:
        fds = [
            os.open(Path(tmp) / f"w{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(args.writers)
        ]
        runs: list[list[dict]] = []
        try:
            for r in range(args.runs):
                modes = list(MODES) if r % 2 == 0 else list(reversed(MODES))
                runs.append(_run(modes, fds, args.writes))
                line = ", ".join(f"{x['mode']} {x['cpu_us']:.1f} us CPU" for x in runs[-1])
                print(f"run {r + 1}/{args.runs}: {line}", file=sys.stderr)
        finally:
            for fd in fds:
                os.close(fd)
    summary = _summary(runs)
    machine = machine_info()
    command = "margo-bench " + " ".join([SCENARIO, *(argv if argv is not None else sys.argv[1:])])
    table = markdown_table(
        ["mode", "CPU us per write", "wall us per write", "CPU against the pool"],
        [
            (m, s["cpu_us"], s["wall_us"], f"{s['cpu_us'] / summary['pool']['cpu_us']:.2f}x")
            for m, s in summary.items()
        ],
    )
    blocks = [
        f"Machine: {machine_line(machine)}; {machine['date']}.",
        f"```\n{command}\n```",
        f"{args.writers} writer(s), {args.writes} writes each per mode, medians of {args.runs} runs:",
        table,
    ]
    data: dict[str, Any] = {
        "machine": machine,
        "command": command,
        "runs": runs,
        "summary": summary,
    }
    json_path, md_path = write_report(args.out, SCENARIO, data, "durable writes: the hop", blocks)
    print(table, end="")
    print(f"wrote {json_path}\nwrote {md_path}")
    return 0


def _summary(runs: list[list[dict]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        rows = [x for run in runs for x in run if x["mode"] == mode]
        out[mode] = {k: median(x[k] for x in rows) or 0.0 for k in ("cpu_us", "wall_us")}
    return out


if __name__ == "__main__":
    sys.exit(main())
