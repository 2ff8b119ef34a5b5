"""Terminal sessions on the controller: a terminal stream per session on the device's own
connection, bridged to an operator (the WebSocket route), with an audit record per session.

Theory of operation
-------------------
``TerminalService.open`` finds the device's live session in the caller's tenant (a device of
another tenant is simply not there), starts the audit record, opens a ``term_open`` stream
and waits for the agent's ``term_opened`` or ``error``. ``TerminalSession.bridge`` then runs
two pumps until the device reports the exit status:

* device -> operator: ``term_data`` is handed to the operator as it arrives (one message,
  one write: nothing waits for a batch), and acknowledged with ``term_ack`` once passed on;
* operator -> device: input, resizes, end of input and close become ``term_data``,
  ``term_resize``, ``term_eof`` and ``term_close``; input waits while a window of bytes
  is unacknowledged by the agent (``TerminalWindow`` keeps both directions' counts).

When the operator goes away the agent is told to close (it kills the process group) and the
bridge still waits a little for the exit status, so the audit record has it. When the
device's connection drops or the controller shuts down, the operator is told why ("device
disconnected: ...", "controller shutting down"). Every session, however it ends, finishes
its audit record: the operator (whose grant the device verified), device, command, start, end, exit status,
bytes each way and the reason.
"""

from __future__ import annotations

import enum
import logging
import shlex
import time
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from controller.device_reach import Unreachable, reach
from controller.ports import DeviceLink
from controller.registry import SessionRegistry
from controller.store.base import Store
from margo_stream.errors import MargoError, ProtocolError, RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.protocol.terminal_window import TerminalWindow
from margo_stream.transport.connection import ConnectionLost, MessageStream, StreamClosed

log = logging.getLogger("margo.controller.terminal")

OPEN_TIMEOUT = 15.0  # for the agent's term_opened
EXIT_TIMEOUT = 5.0  # after we asked the agent to close, for its term_exit
SHUTDOWN_REASON = "controller shutting down"


class TerminalUnavailable(MargoError):
    """The session could not be opened; ``kind`` says why: not-found, not-connected, refused,
    timeout, or elsewhere (another controller of the cluster holds the device: ``api`` is its
    operator API, where the operator can open the session)."""

    def __init__(self, kind: str, reason: str, *, api: str | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.api = api


class OpKind(enum.Enum):
    DATA = "data"
    RESIZE = "resize"
    EOF = "eof"
    CLOSE = "close"


@dataclass(frozen=True, slots=True)
class OperatorInput:
    kind: OpKind
    data: bytes = b""
    rows: int = 0
    cols: int = 0


class Operator(Protocol):
    """The operator's end of a bridge (the WebSocket route implements it)."""

    async def receive(self) -> OperatorInput | None:
        """The operator's next input; ``None`` once the operator went away."""

    async def send_output(self, fd: int, data: bytes) -> None:
        """Pass output on; must not raise once the operator has gone."""


@dataclass(slots=True)
class Outcome:
    """How a session ended: an exit ``status`` or an ``error`` for the operator."""

    status: int | None = None
    reason: str | None = None
    error: str | None = None


class TerminalSession:
    def __init__(
        self,
        service: TerminalService,
        session: DeviceLink,
        stream: MessageStream,
        audit_id: int,
        pid: int,
        operator: str | None = None,
    ) -> None:
        self.service = service
        self.session = session
        self.stream = stream
        self.audit_id = audit_id
        self.pid = pid
        self.operator = operator  # the operator whose grant the device verified
        self.bytes_out = 0  # device -> operator
        self.flow = TerminalWindow()  # sender half: operator -> device; receiver: device -> op
        self._window_open = anyio.Event()
        self._window_open.set()
        self._closing = False
        self._finished = False
        self._ended = False  # our direction of the stream is finished
        self.outcome: Outcome | None = None

    # --- the bridge ---------------------------------------------------------------------------
    async def bridge(self, op: Operator) -> Outcome:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._from_operator, op)
                outcome = await self._from_device(op)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if self.outcome is None:
                    self.outcome = Outcome(error="the session was interrupted")
                await self.finish(self.outcome)
        return outcome

    def _send(self, message: Any, *, end: bool = False) -> bool:
        if self._ended:
            return False
        try:
            self.stream.send(message, end=end)
        except (ProtocolError, ConnectionLost, StreamClosed):
            return False
        self._ended = end
        return True

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            try:
                self.stream.end()
            except (ProtocolError, ConnectionLost, StreamClosed):
                pass

    async def _from_device(self, op: Operator) -> Outcome:
        stream = self.stream
        while True:
            try:
                if self._closing:
                    with anyio.fail_after(EXIT_TIMEOUT):
                        msg = await stream.receive()
                else:
                    msg = await stream.receive()
            except ConnectionLost as exc:
                self.outcome = Outcome(error=_lost_reason(exc))
                return self.outcome
            except StreamClosed as exc:
                self.outcome = Outcome(
                    error=f"the device reset the terminal stream ({ErrorCode.describe(exc.code)})"
                )
                return self.outcome
            except TimeoutError:
                self.outcome = Outcome(error="the device did not confirm the end of the session")
                return self.outcome
            if msg is None:
                self.outcome = Outcome(error="the device ended the session without an exit status")
                return self.outcome
            if isinstance(msg, m.TermData):
                self.bytes_out += len(msg.data)
                await op.send_output(msg.fd, msg.data)
                ack = self.flow.on_delivered(len(msg.data))
                if ack is not None and not self._closing:
                    self._send(m.TermAck(consumed=ack.consumed))
            elif isinstance(msg, m.TermAck):
                try:
                    opened = self.flow.on_ack(msg.consumed)
                except RemoteProtocolError as exc:
                    self.outcome = Outcome(error=f"the device broke the terminal protocol: {exc}")
                    self.stream.reset(exc.code)
                    return self.outcome
                if opened:
                    self._window_open.set()
            elif isinstance(msg, m.TermExit):
                self._end()
                self.outcome = Outcome(status=msg.status, reason=msg.reason)
                return self.outcome

    async def _from_operator(self, op: Operator) -> None:
        while True:
            item = await op.receive()
            if item is None or item.kind is OpKind.CLOSE:
                reason = "operator disconnected" if item is None else "closed by the operator"
                self._closing = True
                self._send(m.TermClose(reason=reason), end=True)
                return
            if item.kind is OpKind.DATA:
                while not self.flow.can_send():
                    self._window_open = anyio.Event()
                    await self._window_open.wait()
                if self._send(m.TermData(data=item.data, fd=0)):
                    self.flow.on_sent(len(item.data))
            elif item.kind is OpKind.RESIZE:
                self._send(m.TermResize(rows=item.rows, cols=item.cols))
            elif item.kind is OpKind.EOF:
                self._send(m.TermEof())

    async def finish(self, outcome: Outcome) -> None:
        if self._finished:
            return
        self._finished = True
        self.service.active.pop(self.audit_id, None)
        self.session.conn.forget_stream(self.stream.stream_id)
        if outcome.error is not None:
            reason = outcome.error
        elif outcome.reason:
            reason = f"exit {outcome.status}: {outcome.reason}"
        else:
            reason = f"exit {outcome.status}"
        try:
            await self.service.store.finish_session_audit(
                self.audit_id,
                bytes_in=self.flow.sent,
                bytes_out=self.bytes_out,
                reason=reason,
                exit_status=outcome.status,
                tenant=self.session.tenant,
                operator=self.operator,
            )
        except Exception:
            log.exception("could not finish the audit record of terminal session %d", self.audit_id)
        log.info(
            "terminal session %d on %s/%s ended: %s (in %d B, out %d B)",
            self.audit_id,
            self.session.tenant,
            self.session.device_id,
            reason,
            self.flow.sent,
            self.bytes_out,
            extra={"event": "terminal-closed", "session": self.audit_id},
        )


def _lost_reason(exc: ConnectionLost) -> str:
    if exc.code == ErrorCode.SHUTTING_DOWN and not exc.by_peer:
        return SHUTDOWN_REASON
    return f"device disconnected: {exc.reason or ErrorCode.describe(exc.code)}"


class TerminalService:
    def __init__(self, store: Store, registry: SessionRegistry) -> None:
        self.store = store
        self.registry = registry
        self.active: dict[int, TerminalSession] = {}
        self.counters = {"opened": 0, "refused": 0}

    async def open(
        self,
        tenant: str,
        device_id: str,
        *,
        operator: str,
        command: list[str] | None,
        rows: int,
        cols: int,
        tty: bool,
        grant: bytes | None = None,
        certificate: bytes | None = None,
    ) -> TerminalSession:
        """Open a session on a connected device of ``tenant``; ``TerminalUnavailable`` if not."""
        session = await reach(self.registry, self.store, tenant, device_id, "open the session")
        if isinstance(session, Unreachable):
            raise TerminalUnavailable(session.kind, session.reason, api=session.api)
        text = shlex.join(command) if command else None
        audit_id = await self.store.start_session_audit(
            tenant, device_id, operator=operator, command=text
        )
        stream = session.conn.open_stream()
        started = time.monotonic()
        reason = None
        try:
            stream.send(
                m.TermOpen(
                    session_id=str(audit_id),
                    command=command,
                    rows=rows,
                    cols=cols,
                    tty=tty,
                    grant=grant,
                    certificate=certificate,
                )
            )
            with anyio.fail_after(OPEN_TIMEOUT):
                reply = await stream.receive()
        except ConnectionLost as exc:
            reason = ("unavailable", _lost_reason(exc))
        except StreamClosed as exc:
            reason = (
                "unavailable",
                f"the device reset the terminal stream ({ErrorCode.describe(exc.code)})",
            )
        except TimeoutError:
            reason = ("timeout", f"the device did not answer within {OPEN_TIMEOUT:g} s")
            stream.reset(ErrorCode.CANCELLED)
        else:
            if isinstance(reply, m.TermOpened):
                term = TerminalSession(self, session, stream, audit_id, reply.pid, reply.operator)
                self.active[audit_id] = term
                self.counters["opened"] += 1
                log.info(
                    "terminal session %d opened on %s/%s by %s: %s (pid %d, %.1f ms)",
                    audit_id,
                    tenant,
                    device_id,
                    operator,
                    text or "login shell",
                    reply.pid,
                    (time.monotonic() - started) * 1000,
                    extra={"event": "terminal-opened", "session": audit_id},
                )
                return term
            if isinstance(reply, m.Error):
                reason = ("refused", reply.reason)
            else:
                reason = ("refused", "the device ended the stream without an answer")
        self.counters["refused"] += 1
        session.conn.forget_stream(stream.stream_id)
        await self.store.finish_session_audit(
            audit_id, reason=f"not opened: {reason[1]}", tenant=tenant
        )
        raise TerminalUnavailable(*reason)


__all__: list[Any] = [
    "Operator",
    "OperatorInput",
    "OpKind",
    "Outcome",
    "TerminalService",
    "TerminalSession",
    "TerminalUnavailable",
]
