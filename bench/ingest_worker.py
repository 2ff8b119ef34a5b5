"""A worker process of simulated agents replaying telemetry, for ``margo-bench ingest``.

Each simulated agent runs the real agent protocol code (our QUIC client, ``Connection``,
``AgentSession``) with its own certificate, and replays ``records`` real telemetry records on a
telemetry stream exactly as the agent does: batches encoded by
``margo_stream.protocol.telemetry_codec.encode_batch``, at most ``in_flight`` unacknowledged,
each acked by the controller only once stored. The batches are encoded once per worker (every
device has its own sequence space, so the same batches serve all of them): the worker's CPU
goes to the network, and the figure measured is the controller's ingest.

JSON lines on stdout: ``ready`` once all agents are connected, then (after ``go`` on stdin)
``done`` with each agent's first-send and fully-acked times (``time.monotonic()``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio

from agent.session import AgentSession
from bench.report_util import raise_nofile_limit
from bench.simfleet import Fleet, SimAgent, device_id
from margo_stream.protocol import messages as m
from margo_stream.protocol.telemetry_codec import encode_batch
from margo_stream.transport.quic_client import connect


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"ev": event, **fields}) + "\n")
    sys.stdout.flush()


def make_batches(records: int, record_bytes: int, batch: int) -> list[m.Telemetry]:
    pad = "x" * max(0, record_bytes - 60)
    out = []
    for first in range(1, records + 1, batch):
        rows = [
            (
                seq,
                "bench",
                json.dumps(
                    {"stream": "bench", "i": seq, "pad": pad}, separators=(",", ":")
                ).encode(),
            )
            for seq in range(first, min(first + batch, records + 1))
        ]
        out.append(encode_batch(rows, oldest=first))
    return out


class ReplayAgent(SimAgent):
    """A ``SimAgent`` whose session replays the prepared batches once ``go`` arrives."""

    __slots__ = ("batches", "go", "in_flight", "result", "ready", "session_tasks")

    def __init__(
        self, config: Any, index: int, batches: list[m.Telemetry], go: anyio.Event, in_flight: int
    ) -> None:
        super().__init__(config, device_id(index))
        self.batches, self.go, self.in_flight = batches, go, in_flight
        self.result: dict[str, float] = {}
        self.ready = anyio.Event()
        self.session_tasks = [self.replay]

    async def replay(self, session: AgentSession) -> None:
        stream = session.conn.open_stream()
        last = self.batches[-1].last
        acked = 0
        window = anyio.Semaphore(self.in_flight)
        done = anyio.Event()

        async def read_acks() -> None:
            nonlocal acked
            while (message := await stream.receive()) is not None:
                if isinstance(message, m.TelemetryAck):
                    while acked < message.seq:
                        # one permit per batch fully acked
                        acked = next(b.last for b in self.batches if b.last > acked)
                        window.release()
                    if acked >= last:
                        self.result["done"] = time.monotonic()
                        done.set()
                        return

        self.ready.set()
        await self.go.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_acks)
            self.result["start"] = time.monotonic()
            for batch in self.batches:
                await window.acquire()
                stream.send(batch)
            await done.wait()


async def run(cfg: dict[str, Any]) -> None:
    fleet = Fleet({**cfg, "mode": "margo"})
    fleet.prepare()
    batches = make_batches(cfg["records"], cfg["record_bytes"], cfg["batch"])
    go = anyio.Event()
    agents = [
        ReplayAgent(fleet.sim_config, fleet.first + i, batches, go, cfg["in_flight"])
        for i in range(fleet.count)
    ]

    async def one(slot: int) -> None:
        conn, transport = await connect(fleet.host, fleet.port, fleet.configs[slot])
        try:
            with anyio.fail_after(30):
                await conn.wait_handshake()
            await AgentSession(agents[slot], conn).run()
        finally:
            conn.close()
            conn.cancel_timer()
            transport.close()

    async with anyio.create_task_group() as tg:
        for slot in range(fleet.count):
            tg.start_soon(one, slot)
        for agent in agents:
            await agent.ready.wait()
        _emit("ready")
        await anyio.to_thread.run_sync(sys.stdin.readline)
        go.set()
        with anyio.fail_after(cfg.get("timeout", 600)):
            while not all("done" in a.result for a in agents):
                await anyio.sleep(0.05)
        _emit("done", results=[a.result for a in agents])
        tg.cancel_scope.cancel()


def main() -> int:
    raise_nofile_limit()
    cfg = json.loads(sys.stdin.readline())
    anyio.run(run, cfg, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
