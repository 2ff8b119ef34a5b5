"""Telemetry on the agent: the durable buffer and its producer socket live for the whole
process (producers keep writing while the link is down); each connection replays the buffer
from the oldest record the controller has not acknowledged.

At most ``MAX_IN_FLIGHT`` batches are unacknowledged at a time, so a large backlog never
crowds the connection: control, desired-state and terminal bytes always find room. Records
are dropped from the buffer only after the controller acked them as durably stored.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import asdict

import anyio

from agent.service import Agent
from agent.session import AgentSession
from agent.telemetry.buffer import BufferConfig, FullPolicy, TelemetryBuffer
from agent.telemetry.ingest import serve_telemetry_socket
from agent.telemetry.metrics import run_agent_metrics
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import StreamKind
from margo_stream.protocol.telemetry_codec import encode_batch

log = logging.getLogger("margo.agent.telemetry")

MAX_IN_FLIGHT = 8
BATCH_RECORDS = 512  # small batches (about 2 ms of work each): see the pacing note below
BATCH_BYTES = 128 * 1024
# Replay is the lowest-priority work on the agent's event loop. A zero sleep would put it back
# at the end of the ready queue, so every step of an interactive task (a push being applied,
# a terminal keystroke) would wait behind a whole batch; a short timer sleep lets every task
# that became ready run first.
YIELD_S = 0.003
IDLE_POLL_MIN, IDLE_POLL_MAX = 0.005, 0.25  # an idle agent checks its buffer less and less often
STATS_INTERVAL = 5.0


def stream_name(payload: bytes) -> str:
    """The record's series (the producer socket guarantees a JSON object with a string one)."""
    try:
        value = json.loads(payload).get("stream")
    except (ValueError, AttributeError):
        return "default"
    return value if isinstance(value, str) and value else "default"


class TelemetryFeature:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        cfg = agent.config
        self.config = BufferConfig(
            max_bytes=cfg.buffer_max_bytes,
            policy=FullPolicy.REJECT if cfg.buffer_policy == "reject" else FullPolicy.DROP_OLDEST,
            commit_window_s=cfg.commit_window_ms / 1000,
        )
        self.buffer: TelemetryBuffer | None = None
        self._ready = anyio.Event()
        agent.background_tasks.append(self.run)
        agent.session_tasks.append(self.replay)
        agent.hello_fields.append(self.hello_fields)
        agent.features["telemetry"] = self

    def hello_fields(self) -> dict[str, object]:
        return {"telemetry_next_seq": self.buffer.next_seq if self.buffer else 1}

    async def run(self) -> None:
        state = self.agent.config.state
        async with TelemetryBuffer.open(state / "telemetry", self.config) as buffer:
            self.buffer = buffer
            self._ready.set()
            async with anyio.create_task_group() as tg:
                await tg.start(serve_telemetry_socket, buffer, state / "telemetry.sock")
                await tg.start(run_agent_metrics, buffer, self.agent.config.metrics_interval)

    def stats(self) -> dict[str, int | float | str | None]:
        if self.buffer is None:
            return {}
        return {f"telemetry_{k}": v for k, v in asdict(self.buffer.stats()).items()}

    async def replay(self, session: AgentSession) -> None:
        await self._ready.wait()
        buffer = self.buffer
        assert buffer is not None and session.ack is not None
        if session.ack.telemetry_acked > buffer.acked_seq:
            # the controller stored these but our ack was lost with the last link
            await buffer.ack(min(session.ack.telemetry_acked, buffer.durable_seq))
        stream = session.conn.open_stream()
        in_flight: deque[int] = deque()
        acked = anyio.Event()
        next_seq = buffer.acked_seq + 1
        idle = IDLE_POLL_MIN

        async def read_acks() -> None:
            nonlocal acked
            while (message := await stream.receive()) is not None:
                if isinstance(message, m.TelemetryAck):
                    while in_flight and in_flight[0] <= message.seq:
                        in_flight.popleft()
                    await buffer.ack(message.seq)
                    acked.set()

        async def report_stats() -> None:
            while True:
                session.send_stats(self.stats())
                await anyio.sleep(STATS_INTERVAL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_acks)
            tg.start_soon(report_stats)
            while True:
                if len(in_flight) >= MAX_IN_FLIGHT:
                    acked = anyio.Event()
                    await acked.wait()
                    continue
                records = buffer.read(next_seq, BATCH_RECORDS, BATCH_BYTES)
                if not records:
                    await anyio.sleep(idle)
                    idle = min(idle * 2, IDLE_POLL_MAX)
                    continue
                idle = IDLE_POLL_MIN
                stream.send(
                    encode_batch(
                        [(r.seq, stream_name(r.payload), r.payload) for r in records],
                        oldest=buffer.first_seq,
                    )
                )
                in_flight.append(records[-1].seq)
                next_seq = records[-1].seq + 1
                await anyio.sleep(YIELD_S)


def install(agent: Agent) -> TelemetryFeature:
    return TelemetryFeature(agent)


__all__ = ["TelemetryFeature", "install", "StreamKind"]
