"""Workload logs on the device: one controller-opened ``logs`` stream per request.

Theory of operation
-------------------
The controller opens the stream with ``logs_open`` (deployment, optional component, ``tail``,
``follow``). :class:`LogsFeature` finds the components the device knows for that deployment
(the ones the reconciler runs, and any whose log is still on disk) and answers ``error``
(``LOGS_NOT_FOUND``) when there are none or the named one is not among them, or
``LOGS_REFUSED`` when ``MAX_STREAMS`` requests are already being served. Otherwise it answers
``logs_opened`` naming the components, sends each one's last ``tail`` lines
(``agent.logs.reader.tail``, read in a worker thread), and, without ``follow``, ``logs_end``
("complete"). With ``follow`` it polls each component's log every ``POLL_S`` and sends new
lines until every component has ended (its runner stopped, or finished and will not restart:
its last lines are sent first, then ``logs_end`` "ended") or the controller ends its side.

Logs are bulk traffic, like telemetry: lines go in batches of at most ``BATCH_BYTES``; at most
``WINDOW`` bytes of lines are unacknowledged (``logs_ack``, the same byte window as terminals:
``margo_stream.protocol.terminal_window``), so a chatty workload never crowds the connection
and a slow operator never grows a buffer; the agent sleeps a little after each batch so
control, desired state and terminal bytes go first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread

from agent.logs.reader import Follower, tail
from agent.ports import AgentHost, LiveSession
from agent.runtime.base import ComponentRunner, deployment_dir_for, is_safe_name
from margo_stream.errors import ProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode, StreamKind
from margo_stream.protocol.terminal_window import TerminalWindow
from margo_stream.state.spec import DeploymentSpec
from margo_stream.transport.connection import ConnectionLost, MessageStream, StreamClosed

log = logging.getLogger("margo.agent.logs")

MAX_STREAMS = 16  # logs requests served at once
POLL_S = 0.2  # how often a follow looks for new lines
BATCH_BYTES = 32 * 1024  # of lines in one logs_lines message
WINDOW = 256 * 1024  # line bytes unacknowledged by the controller
YIELD_S = 0.003  # after each batch: interactive streams first


class Workloads(Protocol):
    """What the logs feature reads of the reconciler."""

    def running(self) -> dict[str, DeploymentSpec]: ...

    def runner(self, deployment_id: str, component: str) -> ComponentRunner | None: ...


def line_cost(line: str) -> int:
    """Bytes a line counts for in the window: its UTF-8 length and one for its end."""
    return len(line.encode("utf-8", "replace")) + 1


def batches(lines: list[str]) -> list[list[str]]:
    """``lines`` cut into messages of at most ``BATCH_BYTES`` (and ``LOGS_MAX_BATCH`` lines)."""
    out: list[list[str]] = []
    current: list[str] = []
    size = 0
    for line in lines:
        cost = line_cost(line)
        if current and (size + cost > BATCH_BYTES or len(current) >= m.LOGS_MAX_BATCH):
            out.append(current)
            current, size = [], 0
        current.append(line)
        size += cost
    if current:
        out.append(current)
    return out


def ended(runner: ComponentRunner | None) -> bool:
    """The component's log will grow no more: no runner, or one that stopped or is done."""
    return runner is None or runner.finished or str(getattr(runner, "phase", "")) == "done"


class _Sender:
    """Sends line batches within the byte window; acks arrive through :meth:`acked`."""

    def __init__(self, stream: MessageStream) -> None:
        self.stream = stream
        self.window = TerminalWindow(WINDOW)
        self._open = anyio.Event()
        self._open.set()

    def acked(self, consumed: int) -> None:
        if self.window.on_ack(consumed):  # RemoteProtocolError for an ack of bytes never sent
            self._open.set()

    async def send(self, component: str, lines: list[str]) -> None:
        for chunk in batches(lines):
            while not self.window.can_send():
                self._open = anyio.Event()
                await self._open.wait()
            self.stream.send(m.LogsLines(component=component, lines=chunk))
            self.window.on_sent(sum(line_cost(line) for line in chunk))
            await anyio.sleep(YIELD_S)


class LogsFeature:
    """Serves ``StreamKind.LOGS`` streams from the components' logs in the state directory."""

    def __init__(self, agent: AgentHost, workloads: Workloads) -> None:
        self.state_dir = Path(agent.config.state)
        self.workloads = workloads
        self.active = 0
        self.counters = {"opened": 0, "refused": 0, "not_found": 0}
        agent.stream_handlers[StreamKind.LOGS] = self.handle_stream

    def components(self, deployment_id: str) -> list[str]:
        """The components of ``deployment_id`` with a log: running ones, and any on disk."""
        names: set[str] = set()
        spec = self.workloads.running().get(deployment_id)
        if spec is not None:
            names.update(c.name for c in spec.components)
        directory = deployment_dir_for(self.state_dir, deployment_id)
        if directory.is_dir():
            names.update(p.name[: -len(".log")] for p in directory.glob("*.log"))
        return sorted(n for n in names if is_safe_name(n))

    def log_path(self, deployment_id: str, component: str) -> Path:
        return deployment_dir_for(self.state_dir, deployment_id) / f"{component}.log"

    def _refusal(self, req: m.LogsOpen) -> tuple[ErrorCode, str, list[str]]:
        if self.active >= MAX_STREAMS:
            return ErrorCode.LOGS_REFUSED, f"{self.active} logs requests already served", []
        names = self.components(req.deployment_id)
        if not names:
            return ErrorCode.LOGS_NOT_FOUND, f"no deployment {req.deployment_id!r}", []
        if req.component is not None:
            if req.component not in names:
                return (
                    ErrorCode.LOGS_NOT_FOUND,
                    f"deployment {req.deployment_id!r} has no component {req.component!r} "
                    f"(it has {', '.join(names)})",
                    [],
                )
            names = [req.component]
        return ErrorCode.NO_ERROR, "", names

    async def handle_stream(self, session: LiveSession, stream: MessageStream) -> None:
        first = await stream.receive()
        if not isinstance(first, m.LogsOpen):
            stream.reset(ErrorCode.PROTOCOL_ERROR)
            return
        code, reason, names = self._refusal(first)
        if code is not ErrorCode.NO_ERROR:
            self.counters["refused" if code is ErrorCode.LOGS_REFUSED else "not_found"] += 1
            stream.send(m.Error(code=code, reason=reason[:1024]), end=True)
            session.conn.forget_stream(stream.stream_id)
            return
        self.active += 1
        self.counters["opened"] += 1
        finished = False
        try:
            stream.send(m.LogsOpened(components=names))
            sender = _Sender(stream)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_acks, stream, sender, tg.cancel_scope)
                reason = await self._serve(first, names, sender)
                stream.send(m.LogsEnd(reason=reason), end=True)
                finished = True
                tg.cancel_scope.cancel()
        except (StreamClosed, ConnectionLost):
            finished = True
        except ProtocolError as exc:  # the controller acked bytes never sent
            log.warning("logs stream %d: %s", stream.stream_id, exc)
            stream.reset(exc.code)
            finished = True
        finally:
            self.active -= 1
            if not finished:  # the controller stopped the follow: end our side too
                try:
                    stream.end()
                except (ProtocolError, StreamClosed, ConnectionLost, RuntimeError):
                    pass
            session.conn.forget_stream(stream.stream_id)

    async def _read_acks(
        self, stream: MessageStream, sender: _Sender, scope: anyio.CancelScope
    ) -> None:
        while (message := await stream.receive()) is not None:
            if isinstance(message, m.LogsAck):
                sender.acked(message.consumed)
        scope.cancel()  # the controller ended its side: the operator went away

    async def _serve(self, req: m.LogsOpen, names: list[str], sender: _Sender) -> str:
        followers: dict[str, Follower] = {}
        try:
            for name in names:
                path = self.log_path(req.deployment_id, name)
                found = await anyio.to_thread.run_sync(tail, path, req.tail)
                lines = found.lines
                if not req.follow and found.partial:
                    lines = [*lines, found.partial]
                if lines:
                    await sender.send(name, lines)
                if req.follow:
                    followers[name] = Follower(path, found.inode, found.offset)
            if not req.follow:
                return "complete"
            while followers:
                await anyio.sleep(POLL_S)
                for name, follower in list(followers.items()):
                    done = ended(self.workloads.runner(req.deployment_id, name))
                    lines = follower.poll()
                    if done:
                        while more := follower.poll():
                            lines += more
                        lines += follower.flush()
                        follower.close()
                        del followers[name]
                    if lines:
                        await sender.send(name, lines)
            return "ended"
        finally:
            for follower in followers.values():
                follower.close()


def install(agent: AgentHost, workloads: Workloads) -> LogsFeature:
    return LogsFeature(agent, workloads)


__all__ = ["LogsFeature", "Workloads", "batches", "ended", "install", "line_cost"]
