"""Telemetry on the agent: the durable buffer and its producer socket live for the whole
process (producers keep writing while the link is down); each connection replays the buffer
from the oldest record the controller has not acknowledged.

At most ``MAX_IN_FLIGHT`` batches are unacknowledged at a time, so a large backlog never
crowds the connection: control, desired-state and terminal bytes always find room. Records
are dropped from the buffer only after the controller acked them as durably stored. The
window and ack rules are the sans-IO ``ReplayWindow`` (``protocol/telemetry_window.py``);
this module reads the buffer, sends, and sleeps until the buffer commits more records.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import anyio

from agent.ports import AgentHost, LiveSession
from agent.telemetry.buffer import BufferConfig, FullPolicy, TelemetryBuffer
from agent.telemetry.ingest import serve_telemetry_socket
from agent.telemetry.metrics import run_agent_metrics
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import StreamKind
from margo_stream.protocol.telemetry_codec import encode_batch
from margo_stream.protocol.telemetry_window import AckAdvanced, ReplayWindow, resume_mark

log = logging.getLogger("margo.agent.telemetry")

MAX_IN_FLIGHT = 8
BATCH_RECORDS = 512  # small batches (about 2 ms of work each): see the pacing note below
BATCH_BYTES = 128 * 1024
# Replay is the lowest-priority work on the agent's event loop. A zero sleep would put it back
# at the end of the ready queue, so every step of an interactive task (a push being applied,
# a terminal keystroke) would wait behind a whole batch; a short timer sleep lets every task
# that became ready run first.
YIELD_S = 0.003
STATS_INTERVAL = 5.0


class TelemetryFeature:
    def __init__(self, agent: AgentHost) -> None:
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

    async def replay(self, session: LiveSession) -> None:
        await self._ready.wait()
        buffer = self.buffer
        assert buffer is not None
        # the controller may have stored records whose ack was lost with the last link
        mark = resume_mark(session.ack.telemetry_acked, buffer.acked_seq, buffer.durable_seq)
        if mark > buffer.acked_seq:
            await buffer.ack(mark)
        stream = session.conn.open_stream()
        window = ReplayWindow(buffer.acked_seq, max_in_flight=MAX_IN_FLIGHT)
        acked = anyio.Event()

        async def read_acks() -> None:
            nonlocal acked
            while (message := await stream.receive()) is not None:
                if not isinstance(message, m.TelemetryAck):
                    continue
                event = window.ack_received(message.seq)
                if not isinstance(event, AckAdvanced):
                    continue
                if event.clamped:
                    log.warning(
                        "controller acknowledged telemetry up to %d, beyond the %d sent",
                        event.claimed,
                        event.mark,
                    )
                await buffer.ack(event.mark)
                acked.set()

        async def report_stats() -> None:
            while True:
                session.send_stats(self.stats())
                await anyio.sleep(STATS_INTERVAL)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_acks)
            tg.start_soon(report_stats)
            while True:
                if not window.can_send:
                    acked = anyio.Event()
                    await acked.wait()
                    continue
                durable = buffer.durable_seq
                records = buffer.read(window.next_seq, BATCH_RECORDS, BATCH_BYTES)
                if not records:
                    await buffer.wait_durable(durable)
                    continue
                stream.send(
                    encode_batch(
                        [(r.seq, r.stream, r.payload) for r in records], oldest=buffer.first_seq
                    )
                )
                window.batch_sent(records[0].seq, records[-1].seq)
                await anyio.sleep(YIELD_S)


def install(agent: AgentHost) -> TelemetryFeature:
    return TelemetryFeature(agent)


__all__ = ["TelemetryFeature", "install", "StreamKind"]
