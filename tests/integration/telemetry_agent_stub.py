"""Test helper (not a test): an agent reduced to its telemetry buffer and producer socket.

    python telemetry_agent_stub.py STATE [--segment-bytes N] [--fsize-limit N] [--policy P]

Prints ``READY`` once the socket accepts producers, then serves until killed.
"""

from __future__ import annotations

import argparse
import resource
import signal
from pathlib import Path

import anyio

from agent.telemetry.buffer import BufferConfig, FullPolicy, TelemetryBuffer
from agent.telemetry.ingest import SOCKET_NAME, serve_telemetry_socket


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("state", type=Path)
    ap.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024)
    ap.add_argument("--segment-bytes", type=int, default=None)
    ap.add_argument("--fsize-limit", type=int, default=None)
    ap.add_argument("--policy", default="drop-oldest")
    args = ap.parse_args()
    if args.fsize_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, args.fsize_limit))
    cfg = BufferConfig(
        max_bytes=args.max_bytes, segment_bytes=args.segment_bytes, policy=FullPolicy(args.policy)
    )

    async def run() -> None:
        async with (
            TelemetryBuffer.open(args.state / "telemetry", cfg) as buf,
            anyio.create_task_group() as tg,
        ):
            await tg.start(serve_telemetry_socket, buf, args.state / SOCKET_NAME)
            print("READY", flush=True)
            await anyio.sleep_forever()

    anyio.run(run)


if __name__ == "__main__":
    main()
