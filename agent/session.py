"""One connection from the agent to the controller: hello, keepalive and the streams.

``AgentSession.run`` opens the control stream, says hello (capabilities, the manifest version
and blobs it holds, where its telemetry stands), waits for the controller's answer, then keeps
the link alive with QUIC pings well inside the idle timeout. It declares the link dead after
three pings in a row go unanswered (two seconds each), much sooner than the idle timeout.
Features (desired state, status, telemetry, terminal) run as tasks in the session's
task group, so all of them stop the moment the connection is gone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from margo_stream.errors import MargoError
from margo_stream.protocol import messages as m
from margo_stream.protocol.channel import StreamFailed
from margo_stream.protocol.codes import ErrorCode, StreamKind
from margo_stream.transport.connection import (
    Connection,
    ConnectionLost,
    MessageStream,
    is_link_loss,
)

if TYPE_CHECKING:
    from agent.service import Agent

log = logging.getLogger("margo.agent.session")

PROBE_S = 2.0  # a ping unanswered this long is a miss
DEAD_AFTER_MISSES = 3


class HelloRefused(MargoError):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"controller refused the hello: {ErrorCode.describe(code)}: {reason}")
        self.code = code


class AgentSession:
    def __init__(self, agent: Agent, conn: Connection) -> None:
        self.agent = agent
        self.conn = conn
        self.control: MessageStream | None = None
        self.ack: m.HelloAck | None = None
        self._tg: TaskGroup | None = None
        conn.handler = self

    # --- ConnectionHandler ----------------------------------------------------------------------
    def stream_opened(self, stream: MessageStream, first: Any) -> None:
        handler = self.agent.stream_handlers.get(stream.kind) if stream.kind else None
        if handler is None or self._tg is None:  # may arrive right behind the hello_ack
            stream.reset(
                ErrorCode.WRONG_STREAM_OPENER if handler is None else ErrorCode.UNEXPECTED_MESSAGE
            )
            return
        self._tg.start_soon(self._guard, handler, stream)

    def stream_failed(self, stream: MessageStream | None, event: StreamFailed) -> None:
        if event.kind is StreamKind.CONTROL:
            self.conn.close(event.code, f"control stream failed: {event.reason}")
        elif not event.reset_by_peer:
            log.info("reset a %s stream: %s", event.kind, event.reason)

    def connection_lost(self, exc: ConnectionLost) -> None:
        pass  # run() is waiting on conn.wait_closed()

    # --- running ----------------------------------------------------------------------------------
    async def _guard(self, handler: Any, stream: MessageStream) -> None:
        try:
            await handler(self, stream)
        except Exception as exc:
            if is_link_loss(exc):
                return
            log.exception("%s stream handler failed", stream.kind)
            if self.conn.closed is None:
                stream.reset(ErrorCode.INTERNAL_ERROR)

    def start_task(self, fn: Any, *args: Any) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._task_guard, fn, args)

    async def _task_guard(self, fn: Any, args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            if not is_link_loss(exc):
                raise

    async def run(self, on_ready: Any = None) -> ConnectionLost:
        agent = self.agent
        async with anyio.create_task_group() as tg:
            self._tg = tg
            control = self.control = self.conn.open_stream()
            control.send(agent.make_hello())
            with anyio.fail_after(agent.config.connect_timeout):
                reply = await control.receive()
            if isinstance(reply, m.Error):
                raise HelloRefused(reply.code, reply.reason)
            if not isinstance(reply, m.HelloAck):
                raise HelloRefused(
                    ErrorCode.UNEXPECTED_MESSAGE, f"unexpected {type(reply).__name__}"
                )
            self.ack = reply
            keepalive = agent.config.keepalive or reply.keepalive_s
            self.start_task(self._keepalive, keepalive)
            self.start_task(self._read_control)
            for task in agent.session_tasks:
                self.start_task(task, self)
            if on_ready is not None:
                on_ready(self)
            lost = await self.conn.wait_closed()
            tg.cancel_scope.cancel()
        return lost

    async def _keepalive(self, interval: float) -> None:
        """Ping every ``interval``; a ping with no packet back within ``probe`` is a miss, and a
        miss is re-probed at once: three misses in a row (seconds, not three whole intervals)
        declare the link dead. A healthy controller answers a ping within milliseconds; one that
        was restarted cannot even say the connection is gone (no stateless reset after a
        restart), so this is how agents find it again quickly."""
        probe = min(PROBE_S, interval / 2)
        misses = 0
        loop = self.conn.loop
        while self.conn.closed is None:
            await anyio.sleep(interval if misses == 0 else probe)
            sent = loop.time()
            self.conn.ping()
            await anyio.sleep(probe)
            if self.conn.last_received >= sent:
                misses = 0
                continue
            misses += 1
            if misses >= DEAD_AFTER_MISSES:
                silent = loop.time() - self.conn.last_received
                log.warning(
                    "no packet from the controller for %.1f s (%d unanswered pings); reconnecting",
                    silent,
                    misses,
                )
                self.conn.close(ErrorCode.NO_ERROR, "controller unresponsive")
                return

    async def _read_control(self) -> None:
        assert self.control is not None
        while True:
            message = await self.control.receive()
            if message is None:
                self.conn.close(ErrorCode.NO_ERROR, "controller ended the control stream")
                return
            if isinstance(message, m.Ping):
                self.control.send(m.Pong(n=message.n))
            elif isinstance(message, m.Error):
                log.warning("controller error: %s", message.reason)

    def send_stats(self, values: dict[str, Any]) -> None:
        if self.control is not None and self.conn.closed is None:
            self.control.send(m.Stats(values=values))
