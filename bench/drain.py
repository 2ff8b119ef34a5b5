"""``margo-bench drain``: time to drain a large offline telemetry backlog after reconnect, and
desired-state push latency while that drain runs against the idle latency in the same run.

One real controller and one real agent process on loopback. Phase 1 (idle): the agent is
connected with an empty buffer; push latency is sampled. Phase 2: the controller goes away
while the agent keeps running, producers write ``--records`` records of ``--record-bytes``
bytes through the agent's real socket (4 pipelining connections), and the controller comes
back on the same port: the drain time runs from the agent's reconnect until the controller
has stored the last record; push latency is sampled while the drain runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench.pushlat import one_device_pki, one_push, watching
from bench.report_util import machine_info, markdown_table, median, percentile, write_report
from bench.signing import Signer
from margo_stream.telemetry_client import AsyncTelemetryClient

BIN = Path(sys.executable).parent
DEVICE = "drain-01"


def _log(msg: str) -> None:
    print(f"[drain] {msg}", file=sys.stderr, flush=True)


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _fill(socket: Path, records: int, record_bytes: int, producers: int = 4) -> float:
    """Write the backlog through the agent's producer socket; records/s acknowledged."""
    pad = "x" * max(0, record_bytes - 60)
    per = records // producers
    t0 = time.perf_counter()

    async def produce(k: int) -> None:
        count = per if k < producers - 1 else records - per * (producers - 1)
        async with AsyncTelemetryClient(socket, timeout=120) as client:
            for start in range(0, count, 2000):
                await client.emit_many(
                    "bench",
                    (
                        {"i": k * per + start + i, "pad": pad}
                        for i in range(min(2000, count - start))
                    ),
                )

    async with anyio.create_task_group() as tg:
        for k in range(producers):
            tg.start_soon(produce, k)
    return records / (time.perf_counter() - t0)


def _watermark(api: str, token: str) -> int:
    r = httpx.get(
        f"{api}/api/v1/devices/{DEVICE}/telemetry",
        params={"limit": 1},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    items = r.json().get("items") or []
    return items[-1]["seq"] if items else 0


async def _ready(ctl: subprocess.Popen, data: Path, root: Path) -> dict[str, Any]:
    ready = data / "controller.json"
    deadline = time.monotonic() + 30
    while not ready.exists():
        if time.monotonic() > deadline or ctl.poll() is not None:
            raise RuntimeError(f"controller did not start; see {root / 'controller.log'}")
        await anyio.sleep(0.02)
    return json.loads(ready.read_text())


def _device(api: str, token: str) -> dict[str, Any]:
    r = httpx.get(
        f"{api}/api/v1/devices/{DEVICE}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    if r.status_code == 404:  # not connected yet, ever
        return {"connected": False, "connection_count": 0}
    r.raise_for_status()
    return r.json()


async def one_run(records: int, record_bytes: int, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="margo-drain-") as tmp:
        root = Path(tmp)
        certs, ident, token = one_device_pki(root, DEVICE)
        signer = Signer.for_tenant(certs, "bench")
        data, state = root / "data", root / "agent"
        data.mkdir()
        state.mkdir()
        ctl_argv = [
            str(BIN / "margo-controller"),
            "--certs",
            str(certs),
            "--data",
            str(data),
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ]
        ctl = _start(ctl_argv, root / "controller.log")
        agent: subprocess.Popen | None = None
        max_bytes = max(64 << 20, records * (record_bytes + 64) * 2)
        try:
            info = await _ready(ctl, data, root)
            api, quic = info["api"], info["quic"]
            agent = _start(
                [
                    str(BIN / "margo-agent"),
                    "--identity",
                    str(ident),
                    "--state",
                    str(state),
                    "--buffer-max-bytes",
                    str(max_bytes),
                    "--metrics-interval",
                    "3600",
                    "--controller",
                    quic,
                ],
                root / "agent.log",
            )
            async with watching(api, token) as (client, watch):
                while not (await anyio.to_thread.run_sync(_device, api, token))["connected"]:
                    await anyio.sleep(0.05)
                await one_push(client, signer, watch, DEVICE, "warmup")
                _log(f"idle push latency, {samples} samples")
                idle = [
                    await one_push(client, signer, watch, DEVICE, f"idle-{i}")
                    for i in range(samples)
                ]
            before = (await anyio.to_thread.run_sync(_device, api, token))["connection_count"]
            base = await anyio.to_thread.run_sync(_watermark, api, token)
            _stop(ctl)  # the link goes down; the agent keeps accepting records
            _log(f"controller down: producers write {records} records of {record_bytes} bytes")
            fill_rate = await _fill(state / "telemetry.sock", records, record_bytes)
            port = quic.rsplit(":", 1)[1]
            ctl = _start(
                [*ctl_argv[:-3], f"127.0.0.1:{port}", "--api", api.rsplit("/", 1)[1]],
                root / "controller.log",
            )
            await _ready(ctl, data, root)
            async with watching(api, token) as (client, watch):
                while (await anyio.to_thread.run_sync(_device, api, token))[
                    "connection_count"
                ] == before:
                    await anyio.sleep(0.005)
                t0 = time.perf_counter()  # reconnected: the drain is under way
                busy: list[float] = []
                done_at: float | None = None
                progress_at = 0.0
                while done_at is None:
                    if len(busy) < samples:
                        busy.append(
                            await one_push(client, signer, watch, DEVICE, f"busy-{len(busy)}")
                        )
                    else:
                        await anyio.sleep(0.05)
                    now = time.perf_counter()
                    if now - progress_at > 1.0 or len(busy) >= samples:
                        wm = await anyio.to_thread.run_sync(_watermark, api, token)
                        progress_at = now
                        _log(f"drained {wm - base}/{records} records after {now - t0:.1f} s")
                        if wm >= base + records:
                            done_at = time.perf_counter()
                    if now - t0 > 600:
                        raise RuntimeError("drain did not finish within 600 s")
            drain_s = done_at - t0
            during = busy
            return {
                "records": records,
                "record_bytes": record_bytes,
                "fill_rate_per_s": fill_rate,
                "drain_seconds": drain_s,
                "drain_rate_per_s": records / drain_s,
                "push_idle_ms": {
                    "p50": percentile(idle, 0.5) * 1e3,
                    "p99": percentile(idle, 0.99) * 1e3,
                    "samples": [x * 1e3 for x in idle],
                },
                "push_during_drain_ms": {
                    "p50": percentile(during, 0.5) * 1e3,
                    "p99": percentile(during, 0.99) * 1e3,
                    "samples": [x * 1e3 for x in during],
                },
                "p99_ratio": percentile(during, 0.99) / percentile(idle, 0.99),
            }
        finally:
            if agent is not None:
                _stop(agent)
            _stop(ctl)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="margo-bench drain", description=__doc__)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--record-bytes", type=int, default=200)
    p.add_argument("--samples", type=int, default=30, help="push latency samples per phase")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/out/drain"))
    args = p.parse_args(argv)
    runs = []
    for i in range(args.runs):
        _log(f"run {i + 1}/{args.runs}")
        runs.append(
            anyio.run(
                one_run,
                args.records,
                args.record_bytes,
                args.samples,
                backend_options={"use_uvloop": True},
            )
        )
    rows = [
        [
            i + 1,
            r["drain_seconds"],
            r["drain_rate_per_s"],
            r["push_idle_ms"]["p50"],
            r["push_idle_ms"]["p99"],
            r["push_during_drain_ms"]["p50"],
            r["push_during_drain_ms"]["p99"],
            r["p99_ratio"],
        ]
        for i, r in enumerate(runs)
    ]
    rows.append(
        [
            "median",
            median(r[1] for r in rows),
            median(r[2] for r in rows),
            median(r[3] for r in rows),
            median(r[4] for r in rows),
            median(r[5] for r in rows),
            median(r[6] for r in rows),
            median(r[7] for r in rows),
        ]
    )
    table = markdown_table(
        [
            "run",
            "drain s",
            "records/s",
            "push idle p50 ms",
            "push idle p99 ms",
            "push during drain p50 ms",
            "p99 ms",
            "p99 ratio",
        ],
        rows,
    )
    data = {
        "scenario": "drain",
        "command": "margo-bench drain " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "runs": runs,
        "date": time.strftime("%Y-%m-%d"),
    }
    write_report(args.out, "drain", data, f"drain: {args.records} records", [table])
    print(table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
