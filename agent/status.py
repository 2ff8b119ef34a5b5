"""Deployment status on the agent: every change the reconciler reports gets a sequence number
and is sent on the session's status stream; on every (re)connect the newest status of every
deployment is sent again, so the controller converges even if acks were lost with a link.

Sequence numbers only grow, across restarts too: they start from the wall clock in
microseconds and never go below the persisted floor (``STATE/status.seq``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import anyio

from agent.ports import AgentHost, LiveSession
from margo_stream.protocol import messages as m
from margo_stream.protocol.status_wire import status_to_wire
from margo_stream.state.status import DeploymentState, DeploymentStatus

log = logging.getLogger("margo.agent.status")


class StatusReporter:
    def __init__(self, agent: AgentHost) -> None:
        self.seq_path: Path = agent.config.state / "status.seq"
        try:
            self._floor = int(self.seq_path.read_text().strip() or 0)
        except (OSError, ValueError):
            self._floor = 0
        self.latest: dict[str, m.Status] = {}
        self._changed = anyio.Event()
        agent.session_tasks.append(self.run_session)

    def _next_seq(self) -> int:
        # The floor only matters if the clock steps back across a restart, so it is written
        # without an fsync: cheap enough for every status change, never in the event loop's way.
        self._floor = max(self._floor + 1, time.time_ns() // 1000)
        tmp = self.seq_path.with_name(self.seq_path.name + ".tmp")
        try:
            tmp.write_text(str(self._floor))
            os.replace(tmp, self.seq_path)
        except OSError as exc:
            log.warning("could not persist the status sequence floor: %s", exc)
        return self._floor

    def on_status(self, status: DeploymentStatus) -> None:
        self.latest[status.deployment_id] = status_to_wire(self._next_seq(), status)
        self._changed.set()

    async def run_session(self, session: LiveSession) -> None:
        stream = session.conn.open_stream()
        sent: dict[str, int] = {}

        async def read_acks() -> None:
            while (ack := await stream.receive()) is not None:
                if isinstance(ack, m.StatusAck) and ack.code is not None:
                    # refused (a claim the controller never issued); acked, so not resent
                    log.warning(
                        "the controller refused status %d: %s",
                        ack.seq,
                        ack.reason,
                        extra={"event": "status-refused", "code": ack.code},
                    )

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_acks)
            while True:
                self._changed = anyio.Event()
                for deployment_id, message in list(self.latest.items()):
                    if sent.get(deployment_id) != message.seq:
                        stream.send(message)
                        sent[deployment_id] = message.seq
                    if message.state == DeploymentState.REMOVED.value:
                        self.latest.pop(deployment_id, None)
                await self._changed.wait()
