"""Workload logs on the controller: a ``logs`` stream on the device's own connection per
request, its lines handed to the operator as they arrive.

Theory of operation
-------------------
:func:`open_logs` finds the device's live session in the caller's tenant (a device of another
tenant is simply not there), opens a stream with ``logs_open`` and waits for the agent's
``logs_opened`` (the components whose lines follow) or ``error`` (no such deployment or
component, or too many requests at once), raising :class:`LogsUnavailable` with a kind the API
maps to a status. :meth:`LogsReader.batches` then yields ``(component, lines)`` as they arrive
and acknowledges each batch with ``logs_ack`` once the caller has passed it on (the agent keeps
a window of unacknowledged bytes: a slow operator slows the device's sending, it never grows a
buffer here). It ends with the agent's ``logs_end``; when the operator goes away first,
:meth:`LogsReader.close` ends our side of the stream, which tells the agent to stop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from controller.device_reach import Unreachable, reach
from controller.ports import DeviceLink
from controller.registry import SessionRegistry
from controller.store.base import Store
from margo_stream.errors import MargoError, ProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.protocol.terminal_window import TerminalWindow
from margo_stream.transport.connection import ConnectionLost, MessageStream, StreamClosed

log = logging.getLogger("margo.controller.logs")

OPEN_TIMEOUT = 15.0  # for the agent's logs_opened
WINDOW = 256 * 1024  # the agent's window of unacknowledged line bytes (agent.logs.feature)


class LogsUnavailable(MargoError):
    """The logs could not be read; ``kind`` says why: not-found (device, deployment or
    component), not-connected, elsewhere (another controller holds the device: ``api``),
    refused (the device serves too many requests now), timeout."""

    def __init__(self, kind: str, reason: str, *, api: str | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.api = api


@dataclass(frozen=True, slots=True)
class LogsRequest:
    deployment_id: str
    component: str | None = None
    tail: int = 100
    follow: bool = False

    def message(self) -> m.LogsOpen:
        return m.LogsOpen(
            deployment_id=self.deployment_id,
            component=self.component,
            tail=self.tail,
            follow=self.follow,
        )


def line_cost(line: str) -> int:
    """What a line counts for in the byte window (as the agent counts it)."""
    return len(line.encode("utf-8", "replace")) + 1


class LogsReader:
    def __init__(self, session: DeviceLink, stream: MessageStream, components: list[str]) -> None:
        self.session = session
        self.stream = stream
        self.components = components
        self.end_reason: str | None = None  # the agent's logs_end, or why the stream broke
        self._flow = TerminalWindow(WINDOW)
        self._closed = False

    async def batches(self, idle: float | None = None) -> AsyncIterator[tuple[str, list[str]]]:
        """``(component, lines)`` as they arrive until the log ends; ``("", [])`` after
        ``idle`` seconds without a line (for a keepalive)."""
        while not self._closed:
            try:
                if idle is None:
                    msg = await self.stream.receive()
                else:
                    with anyio.move_on_after(idle) as scope:
                        msg = await self.stream.receive()
                    if scope.cancelled_caught:
                        yield "", []
                        continue
            except ConnectionLost as exc:
                self.end_reason = f"device disconnected: {exc.reason or exc.code}"
                return
            except StreamClosed as exc:
                self.end_reason = f"the device reset the stream ({ErrorCode.describe(exc.code)})"
                return
            if msg is None:
                self.end_reason = self.end_reason or "the device ended the stream"
                return
            if isinstance(msg, m.LogsEnd):
                self.end_reason = msg.reason
                continue  # its END follows
            if isinstance(msg, m.LogsLines):
                yield msg.component, msg.lines
                ack = self._flow.on_delivered(sum(line_cost(line) for line in msg.lines))
                if ack is not None and self.end_reason is None:
                    self._send(m.LogsAck(consumed=ack.consumed))

    def _send(self, message: m.LogsAck) -> None:
        try:
            self.stream.send(message)
        except (ProtocolError, ConnectionLost, StreamClosed):
            pass

    def close(self) -> None:
        """Done (the log ended or the operator went away): end our side, drop the stream."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stream.end()
        except (ProtocolError, ConnectionLost, StreamClosed, RuntimeError):
            pass
        self.session.conn.forget_stream(self.stream.stream_id)


async def open_logs(
    registry: SessionRegistry,
    store: Store,
    tenant: str,
    device_id: str,
    request: LogsRequest,
) -> LogsReader:
    """Ask the connected device of ``tenant`` for a log; ``LogsUnavailable`` if it cannot."""
    session = await reach(registry, store, tenant, device_id, "read its logs")
    if isinstance(session, Unreachable):
        raise LogsUnavailable(session.kind, session.reason, api=session.api)
    try:
        stream = session.conn.open_stream()
    except ConnectionLost as exc:
        raise LogsUnavailable("not-connected", f"device disconnected: {exc.reason}") from None
    try:
        stream.send(request.message())
        with anyio.fail_after(OPEN_TIMEOUT):
            reply = await stream.receive()
    except (ConnectionLost, StreamClosed) as exc:
        session.conn.forget_stream(stream.stream_id)
        raise LogsUnavailable("not-connected", f"device disconnected: {exc}") from None
    except TimeoutError:
        stream.reset(ErrorCode.CANCELLED)
        raise LogsUnavailable(
            "timeout", f"the device did not answer within {OPEN_TIMEOUT:g} s"
        ) from None
    if isinstance(reply, m.LogsOpened):
        return LogsReader(session, stream, list(reply.components))
    session.conn.forget_stream(stream.stream_id)
    if isinstance(reply, m.Error):
        kind = "not-found" if reply.code == ErrorCode.LOGS_NOT_FOUND else "refused"
        raise LogsUnavailable(kind, reply.reason)
    raise LogsUnavailable("refused", "the device ended the stream without an answer")


__all__ = ["LogsReader", "LogsRequest", "LogsUnavailable", "open_logs"]
