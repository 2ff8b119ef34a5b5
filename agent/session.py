"""One connection from the agent to the controller: hello, keepalive and the streams.

``AgentSession.run`` opens the control stream, says hello (capabilities, the manifest version
and blobs it holds, where its telemetry stands), waits for the controller's answer, then keeps
the link alive with QUIC pings well inside the idle timeout. What the answer means and when the
link is dead are decided by sans-IO cores (``margo_stream.protocol.control.AgentControl`` and
``margo_stream.protocol.keepalive.Keepalive``); this module only carries their messages and
timers. Features (desired state, status, telemetry, terminal) run as tasks in the session's
task group, so all of them stop the moment the connection is gone.

The session depends on a :class:`SessionOwner` (the ``Agent``, or a bench's simulated one),
and is itself the ``agent.ports.LiveSession`` its features see.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup

from agent.ports import SessionTask, StreamHandler
from margo_stream.protocol import messages as m
from margo_stream.protocol.channel import StreamFailed
from margo_stream.protocol.codes import ErrorCode, StreamKind
from margo_stream.protocol.control import (
    AgentControl,
    ControlEnded,
    HelloRefused,
    PeerError,
    SendPong,
)
from margo_stream.protocol.keepalive import Keepalive, LinkDead, SendPing
from margo_stream.transport.channel_connection import ChannelConnection
from margo_stream.transport.connection import (
    ConnectionLost,
    MessageStream,
    is_link_loss,
)

__all__ = ["AgentSession", "HelloRefused", "SessionOwner", "SessionSettings"]

log = logging.getLogger("margo.agent.session")


class SessionSettings(Protocol):
    """The part of the agent's configuration a session reads."""

    @property
    def connect_timeout(self) -> float: ...

    @property
    def keepalive(self) -> float | None: ...


class SessionOwner(Protocol):
    """What a session needs of whoever runs it."""

    @property
    def config(self) -> SessionSettings: ...

    @property
    def stream_handlers(self) -> Mapping[StreamKind, StreamHandler]: ...

    @property
    def session_tasks(self) -> Sequence[SessionTask]: ...

    def make_hello(self) -> m.Hello: ...


class AgentSession:
    def __init__(self, owner: SessionOwner, conn: ChannelConnection) -> None:
        self.owner = owner
        self.conn = conn
        self.control: MessageStream | None = None
        self._control = AgentControl(owner.config.keepalive)
        self._tg: TaskGroup | None = None
        conn.handler = self

    @property
    def ack(self) -> m.HelloAck:
        """The controller's answer to the hello (features run only once it arrived)."""
        if self._control.ack is None:
            raise RuntimeError("the controller has not answered the hello yet")
        return self._control.ack

    # --- ConnectionHandler ----------------------------------------------------------------------
    def stream_opened(self, stream: MessageStream, first: Any) -> None:
        handler = self.owner.stream_handlers.get(stream.kind) if stream.kind else None
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
    async def _guard(self, handler: StreamHandler, stream: MessageStream) -> None:
        try:
            await handler(self, stream)
        except Exception as exc:
            if is_link_loss(exc):
                return
            log.exception("%s stream handler failed", stream.kind)
            if self.conn.closed is None:
                stream.reset(ErrorCode.INTERNAL_ERROR)

    def start_task(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._task_guard, fn, args)

    async def _task_guard(
        self, fn: Callable[..., Awaitable[object]], args: tuple[Any, ...]
    ) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            if not is_link_loss(exc):
                raise

    async def run(self, on_ready: Callable[[AgentSession], object] | None = None) -> ConnectionLost:
        owner = self.owner
        async with anyio.create_task_group() as tg:
            self._tg = tg
            control = self.control = self.conn.open_stream()
            control.send(owner.make_hello())
            with anyio.fail_after(owner.config.connect_timeout):
                reply = await control.receive()
            accepted = self._control.hello_answer(reply)  # raises HelloRefused
            self.start_task(self._keepalive, accepted.keepalive_s)
            self.start_task(self._read_control)
            for task in owner.session_tasks:
                self.start_task(task, self)
            if on_ready is not None:
                on_ready(self)
            lost = await self.conn.wait_closed()
            tg.cancel_scope.cancel()
        return lost

    async def _keepalive(self, interval: float) -> None:
        """Carry out the keepalive core's pings; close the connection when it says so."""
        loop = self.conn.loop
        core = Keepalive(interval, loop.time())
        while self.conn.closed is None:
            await anyio.sleep(max(0.0, core.deadline - loop.time()))
            action = core.timer(loop.time(), self.conn.last_received)
            if isinstance(action, SendPing):
                self.conn.ping()
            elif isinstance(action, LinkDead):
                log.warning(
                    "no packet from the controller for %.1f s (%d unanswered pings); reconnecting",
                    action.silent_s,
                    action.misses,
                )
                self.conn.close(ErrorCode.NO_ERROR, "controller unresponsive")
                return

    async def _read_control(self) -> None:
        assert self.control is not None
        while True:
            event = self._control.received(await self.control.receive())
            if isinstance(event, SendPong):
                self.control.send(event.pong)
            elif isinstance(event, PeerError):
                log.warning("controller error: %s", event.reason)
            elif isinstance(event, ControlEnded):
                self.conn.close(ErrorCode.NO_ERROR, "controller ended the control stream")
                return

    def send_stats(self, values: dict[str, Any]) -> None:
        if self.control is not None and self.conn.closed is None:
            self.control.send(m.Stats(values=values))
