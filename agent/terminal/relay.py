"""The relay between one terminal stream and the process it started.

Theory of operation
-------------------
Once the process runs, :class:`TerminalRelay` answers ``term_opened`` and then relays:

* device -> operator: output as ``term_data`` (fd 1, or 2 for stderr on pipes), each chunk
  sent the moment it is read (no batching delay: a keystroke's echo leaves at once);
* operator -> device: ``term_data`` into the process, ``term_resize`` onto the PTY,
  ``term_eof`` (close stdin, or the PTY's end-of-file character), ``term_close`` (end it);
* when the command exits: whatever output is left, then ``term_exit`` with its status (the
  ``subprocess`` convention: ``-N`` for a signal) and the end of the stream.

Flow control is ``margo_stream.protocol.terminal_window.TerminalWindow``: each side
acknowledges the data bytes it has passed on (``term_ack``) and the sender keeps about a
window of bytes unacknowledged, so ``yes`` or a large upload meets backpressure (the program
blocks on its PTY) instead of growing buffers. An idle watchdog ends a session no byte has
crossed for the policy's idle timeout.
"""

from __future__ import annotations

import logging
from typing import Literal

import anyio
import anyio.lowlevel

from agent.terminal.command import TerminalClosed, TerminalError
from agent.terminal.manager import run_idle_watchdog
from agent.terminal.pipe_session import READ_CHUNK, PipeSession
from agent.terminal.pty_session import PtySession
from margo_stream.errors import ProtocolError, RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.terminal_window import TerminalWindow
from margo_stream.transport.connection import ConnectionLost, MessageStream, StreamClosed

log = logging.getLogger("margo.agent.terminal")

EXIT_DRAIN_S = 0.5  # after the command exits, how long leftover output may take to arrive
CLOSE_GRACE_S = 1.0  # SIGHUP -> SIGTERM -> SIGKILL steps when a session is ended from outside
VEOF = b"\x04"

Process = PtySession | PipeSession
OutputFd = Literal[1, 2]  # stdout, stderr


def send_message(stream: MessageStream, message: m.Message, *, end: bool = False) -> bool:
    """Send on a terminal stream; ``False`` if it can no longer carry anything."""
    try:
        stream.send(message, end=end)
    except (ProtocolError, ConnectionLost, StreamClosed, RuntimeError) as exc:
        # RuntimeError: aioquic refuses data after our FIN (nothing more is owed then)
        log.debug("terminal stream %d: cannot send %s: %s", stream.stream_id, message.t, exc)
        return False
    return True


class TerminalRelay:
    def __init__(
        self,
        stream: MessageStream,
        proc: Process,
        idle_timeout_s: float,
        operator: str | None = None,
    ) -> None:
        self.stream = stream
        self.proc = proc
        self.operator = operator  # whose grant opened the session
        self.idle_timeout_s = idle_timeout_s
        self.reason: str | None = None
        self.window = TerminalWindow()
        self._window_open = anyio.Event()
        self._window_open.set()
        self.peer_gone = False

    async def run(self) -> None:
        stream, proc = self.stream, self.proc
        if not send_message(stream, m.TermOpened(pid=proc.pid, operator=self.operator)):
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._input)
            tg.start_soon(self._idle)
            status = await self._output_until_exit()
            if not self.peer_gone:
                send_message(stream, m.TermExit(status=status, reason=self.reason), end=True)
            tg.cancel_scope.cancel()

    async def _output_until_exit(self) -> int:
        proc = self.proc
        fds: tuple[OutputFd, ...] = (1, 2) if isinstance(proc, PipeSession) else (1,)
        drained = anyio.Event()
        left = len(fds)

        async def pump(fd: OutputFd) -> None:
            nonlocal left
            try:
                await self._pump(fd)
            finally:
                left -= 1
                if left == 0:
                    drained.set()

        async with anyio.create_task_group() as pumps:
            for fd in fds:
                pumps.start_soon(pump, fd)
            status = await proc.wait()
            # the command is gone: let what it wrote arrive, but do not wait for a background
            # process that still holds the terminal open (close() ends that one)
            with anyio.move_on_after(EXIT_DRAIN_S):
                await drained.wait()
            pumps.cancel_scope.cancel()
        return status

    async def _pump(self, fd: OutputFd) -> None:
        proc = self.proc
        while True:
            while not self.window.can_send():
                self._window_open = anyio.Event()
                await self._window_open.wait()
            if isinstance(proc, PipeSession):
                data = await proc.read(fd, READ_CHUNK)
            else:
                data = await proc.read(READ_CHUNK)
            if not data:
                return
            self.window.on_sent(len(data))
            if not send_message(self.stream, m.TermData(data=data, fd=fd)):
                return
            await anyio.lowlevel.checkpoint()  # a flood must not starve the event loop

    async def _input(self) -> None:
        stream, proc = self.stream, self.proc
        try:
            while True:
                msg = await stream.receive()
                if msg is None or isinstance(msg, m.TermClose):
                    self.reason = self.reason or (
                        "closed by the operator" if msg is not None else "operator went away"
                    )
                    await proc.close(CLOSE_GRACE_S)
                    return
                await self._handle(msg)
        except (StreamClosed, ConnectionLost):
            self.peer_gone = True
            self.reason = self.reason or "the stream to the controller was lost"
            await proc.close(CLOSE_GRACE_S)
        except RemoteProtocolError as exc:
            self.peer_gone = True
            self.reason = self.reason or f"protocol error from the controller: {exc}"
            stream.reset(exc.code)
            await proc.close(CLOSE_GRACE_S)

    async def _handle(self, msg: object) -> None:
        proc = self.proc
        if isinstance(msg, m.TermData):
            try:
                await proc.write(msg.data)
            except TerminalClosed:
                return  # the process stopped reading; its exit will follow
            ack = self.window.on_delivered(len(msg.data))
            if ack is not None:
                send_message(self.stream, m.TermAck(consumed=ack.consumed))
        elif isinstance(msg, m.TermAck):
            self.window.on_ack(msg.consumed)
            self._window_open.set()
        elif isinstance(msg, m.TermResize):
            if isinstance(proc, PtySession):
                try:
                    proc.resize(msg.rows, msg.cols)
                except TerminalError:
                    pass
        elif isinstance(msg, m.TermEof):
            if isinstance(proc, PipeSession):
                proc.close_stdin()
            else:
                try:
                    await proc.write(VEOF)
                except TerminalClosed:
                    pass

    async def _idle(self) -> None:
        def note(_: object) -> None:
            self.reason = f"idle for {self.idle_timeout_s:g} s"

        await run_idle_watchdog(self.proc, self.idle_timeout_s, note)  # type: ignore[arg-type]
