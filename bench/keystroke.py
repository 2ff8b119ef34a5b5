"""``margo-bench keystroke``: keystroke round trip through a terminal session.

One real controller and one real agent process on loopback. The operator side (this process)
opens a terminal session over the controller's WebSocket route running
``stty raw -echo; exec cat`` on a PTY of the device, then sends one byte at a time and times
until that byte comes back: operator -> controller -> QUIC stream -> agent -> PTY -> ``cat``
-> PTY -> agent -> controller -> operator.

Two phases per run:

* idle: nothing else on the device's connection;
* drain: the controller is stopped, the agent buffers ``--records`` telemetry records while
  offline, the controller comes back on the same port, and the keystrokes are timed while
  the agent replays that backlog at full rate on the same QUIC connection. Keystrokes stop
  the moment the last record is stored, so every sample was taken during the drain.

Writes ``<out>/keystroke.json`` (all samples) and ``<out>/keystroke.md`` (medians over runs of
each run's p50/p99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from bench.report_util import machine_info, machine_line, median, percentile, poll_until
from margo_stream.identity.pki import init_pki, issue_device
from margo_stream.telemetry_client import TelemetryClient

BIN = Path(sys.executable).parent
DEVICE = "press-01"
TENANT = "acme"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.certs = work / "certs"
        init_pki(self.certs, [TENANT], ["localhost", "127.0.0.1"])
        self.identity = issue_device(self.certs, TENANT, DEVICE)
        self.token = (self.certs / TENANT / "operator.token").read_text().strip()
        self.quic_port = free_udp_port()
        self.ctl: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.api = ""

    def start_controller(self) -> None:
        data = self.work / "data"
        ready = data / "controller.json"
        ready.unlink(missing_ok=True)
        data.mkdir(exist_ok=True)
        log = open(self.work / "controller.log", "ab")  # noqa: SIM115 - lives with the process
        self.ctl = subprocess.Popen(
            [
                str(BIN / "margo-controller"),
                "--certs",
                str(self.certs),
                "--data",
                str(data),
                "--listen",
                f"127.0.0.1:{self.quic_port}",
                "--api",
                "127.0.0.1:0",
                "--log-level",
                "warning",
                "--log-format",
                "text",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        info = poll_until(
            lambda: ready.exists() and json.loads(ready.read_text()), 30, "controller ready"
        )
        self.api = info["api"]

    def start_agent(self) -> None:
        log = open(self.work / "agent.log", "ab")  # noqa: SIM115
        self.agent = subprocess.Popen(
            [
                str(BIN / "margo-agent"),
                "--identity",
                str(self.identity),
                "--controller",
                f"127.0.0.1:{self.quic_port}",
                "--state",
                str(self.work / "agent"),
                "--keepalive",
                "1",
                "--backoff-base",
                "0.05",
                "--backoff-cap",
                "0.2",
                "--log-level",
                "warning",
                "--log-format",
                "text",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def device(self) -> dict[str, Any]:
        r = httpx.get(
            f"{self.api}/api/v1/devices/{DEVICE}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        return r.json() if r.status_code == 200 else {}

    def wait_connected(self) -> None:
        poll_until(lambda: self.device().get("connected"), 60, "device connected")

    def has_record(self, seq: int) -> bool:
        r = httpx.get(
            f"{self.api}/api/v1/devices/{DEVICE}/telemetry",
            params={"after": seq - 1, "limit": 1},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        return r.status_code == 200 and bool(r.json()["items"])

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def stop_controller(self) -> None:
        self._stop(self.ctl)
        self.ctl = None

    def stop(self) -> None:
        self._stop(self.agent)
        self.stop_controller()


async def keystrokes(
    api: str, token: str, count: int, gap_s: float, stop: threading.Event | None = None
) -> list[float]:
    """Round-trip times in milliseconds of ``count`` single-byte keystrokes (fewer if
    ``stop`` is set first)."""
    url = api.replace("http://", "ws://", 1) + f"/api/v1/devices/{DEVICE}/terminal"
    async with connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        compression=None,
        proxy=None,
        max_size=None,
    ) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "open",
                    "rows": 24,
                    "cols": 80,
                    "tty": True,
                    "command": ["sh", "-c", "stty raw -echo; echo READY; exec cat"],
                }
            )
        )
        opened = json.loads(await ws.recv())
        if opened.get("type") != "opened":
            raise RuntimeError(f"session refused: {opened}")
        seen = b""
        while b"READY" not in seen:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                seen += msg[1:]
        await asyncio.sleep(0.2)  # let the trailing newline of READY arrive
        while True:  # swallow anything left
            try:
                await asyncio.wait_for(ws.recv(), 0.05)
            except TimeoutError:
                break
        samples: list[float] = []
        for i in range(count):
            if stop is not None and stop.is_set():
                break
            key = bytes((97 + i % 26,))
            t0 = time.perf_counter()
            await ws.send(b"\x00" + key)
            got = b""
            while key not in got:
                msg = await ws.recv()
                if isinstance(msg, bytes):
                    got += msg[1:]
            samples.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(gap_s)
        await ws.send(json.dumps({"type": "close"}))
        return samples


def fill_backlog(state: Path, records: int, payload: int) -> float:
    """Emit ``records`` telemetry records into the (offline) agent; returns the seconds taken."""
    sock = state / "telemetry.sock"
    poll_until(sock.exists, 30, "telemetry socket")
    body = {"v": 1.0, "pad": "x" * payload}
    t0 = time.perf_counter()
    with TelemetryClient(sock) as client:
        for start in range(0, records, 2000):
            client.emit_many("bench.drain", [body] * min(2000, records - start))
    return time.perf_counter() - t0


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": round(percentile(samples, 0.5), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "max_ms": round(max(samples), 3) if samples else float("nan"),
    }


def one_run(args: argparse.Namespace, run: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"margo-keystroke-{run}-"))
    procs = Procs(work)
    try:
        procs.start_controller()
        procs.start_agent()
        procs.wait_connected()
        idle = asyncio.run(keystrokes(procs.api, procs.token, args.keys, args.gap_ms / 1000))
        # drain: the controller goes away, a backlog piles up on the device, the link returns
        procs.stop_controller()
        fill_s = fill_backlog(work / "agent", args.records, args.payload)
        procs.start_controller()
        t_back = time.perf_counter()
        procs.wait_connected()
        drained = threading.Event()
        drained_at: list[float] = []

        def watch_drain() -> None:  # keystrokes count only while the backlog is draining
            while not procs.has_record(args.records):
                time.sleep(0.1)
            drained_at.append(time.perf_counter())
            drained.set()

        watcher = threading.Thread(target=watch_drain, daemon=True)
        watcher.start()
        drain = asyncio.run(
            keystrokes(procs.api, procs.token, args.keys, args.gap_ms / 1000, drained)
        )
        t_keys_done = time.perf_counter()
        drained_before_keys_done = drained.is_set()
        watcher.join(600)
        drain_s = drained_at[0] - t_back
        return {
            "run": run,
            "idle": summary(idle),
            "drain": summary(drain),
            "idle_samples": idle,
            "drain_samples": drain,
            "backlog_records": args.records,
            "record_bytes": args.payload,
            "backlog_fill_s": round(fill_s, 2),
            "drain_s": round(drain_s, 2),
            "drain_records_per_s": round(args.records / drain_s),
            "keys_s": round(t_keys_done - t_back, 2),
            "drain_outlasted_keys": not drained_before_keys_done,
        }
    finally:
        procs.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        f"Keystroke round trip (operator -> controller -> QUIC -> device PTY -> back), "
        f"up to {report['params']['keys']} keystrokes per phase, {len(report['runs'])} runs; "
        f"{machine_line(report['machine'])}.",
        "",
        "| phase | p50 ms (median of runs) | p99 ms (median of runs) | target p99 |",
        "|---|---|---|---|",
        f"| idle connection | {s['idle_p50_ms']} | {s['idle_p99_ms']} | <= 10 ms |",
        f"| telemetry drain at full rate | {s['drain_p50_ms']} | {s['drain_p99_ms']} | <= 30 ms |",
        "",
        f"Drain: {report['params']['records']} records of ~{report['params']['payload']} B "
        f"buffered offline, replayed at a median {s['drain_records_per_s']} records/s over "
        f"{s['drain_s']} s (from the controller's restart); keystrokes were timed only while "
        f"the backlog was still draining: a median {s['drain_keys']} per run.",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="margo-bench keystroke", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--keys", type=int, default=1000, help="keystrokes per phase (at most)")
    p.add_argument("--gap-ms", type=float, default=10.0, help="pause between keystrokes")
    p.add_argument("--records", type=int, default=1_500_000, help="telemetry backlog records")
    p.add_argument("--payload", type=int, default=100, help="padding bytes per record")
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument("--keep", action="store_true", help="keep the work directories")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs = []
    for run in range(1, args.runs + 1):
        result = one_run(args, run)
        runs.append(result)
        print(
            f"run {run}: idle p50 {result['idle']['p50_ms']} p99 {result['idle']['p99_ms']} ms; "
            f"drain p50 {result['drain']['p50_ms']} p99 {result['drain']['p99_ms']} ms "
            f"(backlog filled in {result['backlog_fill_s']} s; drain {result['drain_s']} s, "
            f"{result['drain_records_per_s']} rec/s, "
            f"outlasted keys: {result['drain_outlasted_keys']})",
            flush=True,
        )
    summ = {
        "idle_p50_ms": median(r["idle"]["p50_ms"] for r in runs),
        "idle_p99_ms": median(r["idle"]["p99_ms"] for r in runs),
        "drain_p50_ms": median(r["drain"]["p50_ms"] for r in runs),
        "drain_p99_ms": median(r["drain"]["p99_ms"] for r in runs),
        "drain_records_per_s": median(r["drain_records_per_s"] for r in runs),
        "drain_s": median(r["drain_s"] for r in runs),
        "keys_s": median(r["keys_s"] for r in runs),
        "drain_outlasted_keys": sum(1 for r in runs if r["drain_outlasted_keys"]),
        "drain_keys": median(r["drain"]["n"] for r in runs),
    }
    report = {
        "scenario": "keystroke",
        "machine": machine_info(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs,
        "summary": summ,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "keystroke.json").write_text(json.dumps(report, indent=1))
    (args.out / "keystroke.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
