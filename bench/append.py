"""Durable append rate of the agent's telemetry buffer (group commit), printed as JSON.

    python -m bench.append [--records N] [--runs 3] [--mode api|socket|all]

Modes (each run starts from an empty buffer in a fresh temporary directory):
  api_append       N records of ``--payload-bytes`` via ``await buf.append()`` from
                   ``--tasks`` concurrent tasks; a record counts once it is durable.
  api_append_many  the same records via ``append_many`` in batches of ``--batch``.
  socket           the agent side (buffer + producer socket) in a child process, ``--producers``
                   threads in this process each pipelining ``--window`` JSON lines at a time on
                   its own connection; a record counts when its ``{"seq": N}`` reply arrives.
Reports every run and the median, in records/s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import anyio

from agent.telemetry.buffer import BufferConfig, TelemetryBuffer
from agent.telemetry.ingest import SOCKET_NAME, serve_telemetry_socket


def _backend_options() -> dict[str, object]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def _config(args: argparse.Namespace) -> BufferConfig:
    return BufferConfig(max_bytes=args.max_bytes, commit_window_s=args.commit_window_ms / 1000.0)


def _payload(size: int) -> bytes:
    head = b'{"stream":"bench","ts":1700000000.0,"pad":"'
    tail = b'"}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def run_api(args: argparse.Namespace, many: bool) -> float:
    payload = _payload(args.payload_bytes)

    async def main() -> float:
        with tempfile.TemporaryDirectory(prefix="bench-append-") as tmp:
            async with TelemetryBuffer.open(Path(tmp), _config(args)) as buf:
                per_task = args.records // args.tasks

                async def single() -> None:
                    for _ in range(per_task):
                        await buf.append(payload)

                async def batched() -> None:
                    left = per_task
                    while left > 0:
                        n = min(args.batch, left)
                        await buf.append_many([payload] * n)
                        left -= n

                t0 = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for _ in range(args.tasks):
                        tg.start_soon(batched if many else single)
                elapsed = time.perf_counter() - t0
                assert buf.durable_seq == per_task * args.tasks
                return per_task * args.tasks / elapsed

    return anyio.run(main, backend_options=_backend_options())


def _serve(state: str, max_bytes: int, window_ms: float, ready: object) -> None:
    cfg = BufferConfig(max_bytes=max_bytes, commit_window_s=window_ms / 1000.0)

    async def main() -> None:
        async with (
            TelemetryBuffer.open(Path(state) / "telemetry", cfg) as buf,
            anyio.create_task_group() as tg,
        ):
            await tg.start(serve_telemetry_socket, buf, Path(state) / SOCKET_NAME)
            ready.send(True)  # type: ignore[attr-defined]
            await anyio.sleep_forever()

    anyio.run(main, backend_options=_backend_options())


def _producer(path: Path, lines: bytes, n_lines: int, rounds: int, errors: list[str]) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    try:
        for _ in range(rounds):
            sock.sendall(lines)
            got = 0
            buf = b""
            while got < n_lines:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    errors.append("agent closed the connection")
                    return
                buf += chunk
                got += chunk.count(b"\n")
            if b"error" in buf:
                errors.append(buf.split(b"\n")[0].decode())
                return
    finally:
        sock.close()


def run_socket(args: argparse.Namespace) -> float:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-append-") as tmp:
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_serve, args=(tmp, args.max_bytes, args.commit_window_ms, child), daemon=True
        )
        proc.start()
        try:
            if not parent.poll(30):
                raise RuntimeError("bench agent did not start")
            parent.recv()
            line = _payload(args.payload_bytes) + b"\n"
            rounds = max(1, args.records // (args.producers * args.window))
            lines = line * args.window
            errors: list[str] = []
            threads = [
                threading.Thread(
                    target=_producer,
                    args=(Path(tmp) / SOCKET_NAME, lines, args.window, rounds, errors),
                )
                for _ in range(args.producers)
            ]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            if errors:
                raise RuntimeError(f"producer failed: {errors[0]}")
            return rounds * args.window * args.producers / elapsed
        finally:
            proc.terminate()
            proc.join(10)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.append", description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--payload-bytes", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mode", choices=["api", "socket", "all"], default="all")
    ap.add_argument("--tasks", type=int, default=512, help="concurrent appending tasks (api)")
    ap.add_argument("--batch", type=int, default=256, help="append_many batch size")
    ap.add_argument("--producers", type=int, default=4, help="socket producer connections")
    ap.add_argument("--window", type=int, default=1000, help="pipelined lines per producer")
    ap.add_argument("--commit-window-ms", type=float, default=2.0)
    ap.add_argument("--max-bytes", type=int, default=256 * 1024 * 1024)
    args = ap.parse_args(argv)
    modes = {"api": ["api_append", "api_append_many"], "socket": ["socket"]}.get(
        args.mode, ["api_append", "api_append_many", "socket"]
    )
    runners = {
        "api_append": lambda: run_api(args, many=False),
        "api_append_many": lambda: run_api(args, many=True),
        "socket": lambda: run_socket(args),
    }
    result: dict[str, object] = {
        "benchmark": "telemetry buffer durable append rate (group commit)",
        "command": "python -m bench.append " + " ".join(sys.argv[1:] if argv is None else argv),
        "payload_bytes": args.payload_bytes,
        "records_per_run": args.records,
        "commit_window_ms": args.commit_window_ms,
        "cpus": os.cpu_count(),
        "results": {},
    }
    for mode in modes:
        rates = [runners[mode]() for _ in range(args.runs)]
        result["results"][mode] = {  # type: ignore[index]
            "runs_records_per_s": [round(r) for r in rates],
            "median_records_per_s": round(statistics.median(rates)),
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
