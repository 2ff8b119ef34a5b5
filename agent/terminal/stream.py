"""The agent's side of a terminal stream: one controller-opened QUIC stream per session.

Theory of operation
-------------------
The controller opens the stream with ``term_open``. The agent admits it against the device's
policy (terminals enabled, fewer than ``terminal_max_sessions`` open) and starts the command:
with ``tty`` on a real pseudo-terminal of the requested size (:class:`PtySession`), without
it on plain pipes (:class:`PipeSession`), so a non-interactive ``exec`` gets stdout and stderr
apart and a real end of input. It answers ``term_opened`` (or ``error`` with the reason, and
ends the stream) and then relays:

* device -> operator: output as ``term_data`` (fd 1, or 2 for stderr on pipes), each chunk
  sent the moment it is read (no batching delay: a keystroke's echo leaves at once);
* operator -> device: ``term_data`` into the process, ``term_resize`` onto the PTY,
  ``term_eof`` (close stdin, or the PTY's end-of-file character), ``term_close`` (end it);
* when the command exits: whatever output is left, then ``term_exit`` with its status (the
  ``subprocess`` convention: ``-N`` for a signal) and the end of the stream.

Flow control: each side acknowledges the data bytes it has passed on (``term_ack``) and the
sender keeps at most ``WINDOW`` bytes unacknowledged, so ``yes`` or a large upload meets
backpressure (the program blocks on its PTY) instead of growing buffers. Interactive traffic
stays far below the window and is never held back.

However the session ends (exit, operator close, stream reset, idle timeout, the connection
dropping, the agent stopping), the ``finally`` closes the PTY and kills the process group.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import time
from typing import Any

import anyio
import anyio.lowlevel

from agent.service import Agent
from agent.session import AgentSession
from agent.terminal.manager import (
    DISABLED_REASON,
    TerminalManager,
    TerminalPolicy,
    TerminalRefused,
    run_idle_watchdog,
)
from agent.terminal.pty_session import (
    PtySession,
    TerminalClosed,
    TerminalError,
    _resolve,
    write_all,
)
from margo_stream.errors import ProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode, StreamKind
from margo_stream.transport.connection import ConnectionLost, MessageStream, StreamClosed

log = logging.getLogger("margo.agent.terminal")

WINDOW = 256 * 1024  # unacknowledged data bytes either way
ACK_EVERY = WINDOW // 4
READ_CHUNK = 32 * 1024
EXIT_DRAIN_S = 0.5  # after the command exits, how long leftover output may take to arrive
CLOSE_GRACE_S = 1.0  # SIGHUP -> SIGTERM -> SIGKILL steps when a session is ended from outside
VEOF = b"\x04"


class PipeSession:
    """A command on pipes (no terminal) in its own process group: what ``exec`` runs.

    Duck-compatible with :class:`PtySession` where the relay and the idle watchdog need it.
    """

    def __init__(self, proc: subprocess.Popen[bytes], pidfd: int | None) -> None:
        self._proc = proc
        self._pidfd = pidfd
        self.pid = proc.pid
        self.returncode: int | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._last = time.monotonic()
        self._closing = False
        self._closed = anyio.Event()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            assert f is not None
            os.set_blocking(f.fileno(), False)
        self._fds: dict[int, int | None] = {
            0: proc.stdin.fileno(),  # type: ignore[union-attr]
            1: proc.stdout.fileno(),  # type: ignore[union-attr]
            2: proc.stderr.fileno(),
        }  # type: ignore[union-attr]

    @classmethod
    def spawn(cls, command: list[str] | None, shell: str | None) -> PipeSession:
        path, argv, env = _resolve(command, shell, None)
        home = env.get("HOME", "")
        try:
            proc = subprocess.Popen(  # noqa: S603 - the operator's command, on purpose
                argv,
                executable=path,
                env=env,
                cwd=home if os.path.isdir(home) else "/",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise TerminalError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        try:
            pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = None
        return cls(proc, pidfd)

    @property
    def closed(self) -> bool:
        return self._closing

    def idle_seconds(self) -> float:
        return time.monotonic() - self._last

    async def read(self, fd: int, max_bytes: int = READ_CHUNK) -> bytes:
        while True:
            raw = self._fds.get(fd)
            if raw is None:
                return b""
            try:
                data = os.read(raw, max_bytes)
            except BlockingIOError:
                try:
                    await anyio.wait_readable(raw)
                except anyio.ClosedResourceError:
                    return b""
                continue
            except OSError:
                return b""
            if data:
                self.bytes_out += len(data)
                self._last = time.monotonic()
            return data

    async def write(self, data: bytes) -> None:
        await write_all(
            lambda: self._fds.get(0),
            data,
            closed="the command's input is closed",
            hangup_errno=errno.EPIPE,
            hangup="the command closed its input",
            failed="writing to the command failed",
            written=self._wrote,
        )

    def _wrote(self, n: int) -> None:
        self.bytes_in += n
        self._last = time.monotonic()

    def close_stdin(self) -> None:
        self._close_fd(0)

    def _close_fd(self, fd: int) -> None:
        raw = self._fds.get(fd)
        if raw is None:
            return
        self._fds[fd] = None
        try:
            anyio.notify_closing(raw)
        except RuntimeError:
            pass
        {0: self._proc.stdin, 1: self._proc.stdout, 2: self._proc.stderr}[fd].close()  # type: ignore[union-attr]

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._proc.poll()
        return self.returncode

    async def wait(self) -> int:
        while self.poll() is None:
            if self._pidfd is not None:
                try:
                    await anyio.wait_readable(self._pidfd)
                except anyio.ClosedResourceError:
                    await anyio.sleep(0.01)
            else:
                await anyio.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self, grace_s: float = 2.0) -> None:
        """Kill the process group (SIGHUP, SIGTERM, SIGKILL, ``grace_s`` apart), reap, close."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            with anyio.CancelScope(shield=True):
                for sig, wait_s in (
                    (signal.SIGHUP, grace_s),
                    (signal.SIGTERM, grace_s),
                    (signal.SIGKILL, 5.0),
                ):
                    if self.poll() is not None and not _group_alive(self.pid):
                        break
                    try:
                        os.killpg(self.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
                    with anyio.move_on_after(wait_s):
                        await self.wait()
                        while _group_alive(self.pid):
                            await anyio.sleep(0.01)
                        break
        finally:
            for fd in (0, 1, 2):
                self._close_fd(fd)
            if self._pidfd is not None:
                pidfd, self._pidfd = self._pidfd, None
                try:
                    anyio.notify_closing(pidfd)
                except RuntimeError:
                    pass
                os.close(pidfd)
            self._closed.set()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


Process = PtySession | PipeSession


class TerminalFeature:
    """Serves ``StreamKind.TERMINAL`` streams within the device's terminal policy."""

    def __init__(self, agent: Agent) -> None:
        cfg = agent.config
        enabled = cfg.terminal_enabled and cfg.terminal_max_sessions >= 1
        self.policy = TerminalPolicy(
            enabled=enabled,
            max_sessions=max(1, cfg.terminal_max_sessions),
            idle_timeout_s=cfg.terminal_idle_timeout,
        )
        self.manager = TerminalManager(self.policy)
        self._pipes: set[PipeSession] = set()
        self.counters = {"opened": 0, "refused": 0}
        agent.stream_handlers[StreamKind.TERMINAL] = self.handle_stream
        agent.shutdown_hooks.append(self.close_all)
        agent.features["terminal"] = self

    @property
    def active(self) -> int:
        return self.manager.active_count + len(self._pipes)

    def _admit(self) -> None:
        if not self.policy.enabled:
            raise TerminalRefused(DISABLED_REASON)
        if self.active >= self.policy.max_sessions:
            raise TerminalRefused(
                f"{self.active} terminal sessions already open on this device "
                f"(limit {self.policy.max_sessions})"
            )

    async def _open(self, req: m.TermOpen) -> Process:
        self._admit()  # checked and reserved without an await in between
        if req.tty:
            return await self.manager.open(req.command, req.rows, req.cols)
        pipe = PipeSession.spawn(req.command, self.policy.shell)
        self._pipes.add(pipe)
        return pipe

    async def close_all(self) -> None:
        await self.manager.close_all(grace_s=CLOSE_GRACE_S)
        for pipe in list(self._pipes):
            await pipe.close(CLOSE_GRACE_S)

    async def handle_stream(self, session: AgentSession, stream: MessageStream) -> None:
        first = await stream.receive()
        if not isinstance(first, m.TermOpen):
            stream.reset(ErrorCode.PROTOCOL_ERROR)
            return
        what = " ".join(first.command) if first.command else "login shell"
        try:
            proc = await self._open(first)
        except TerminalError as exc:  # TerminalRefused included
            self.counters["refused"] += 1
            reason = getattr(exc, "reason", None) or str(exc)
            log.info(
                "terminal session %s refused: %s",
                first.session_id,
                reason,
                extra={"event": "terminal-refused"},
            )
            _send(stream, m.Error(code=ErrorCode.TERMINAL_REFUSED, reason=reason[:1024]), end=True)
            return
        self.counters["opened"] += 1
        log.info(
            "terminal session %s started (%s, pid %d, %s)",
            first.session_id,
            what,
            proc.pid,
            "pty" if first.tty else "pipes",
            extra={"event": "terminal-opened"},
        )
        relay = _Relay(stream, proc, self.policy.idle_timeout_s)
        try:
            await relay.run()
            if not relay.peer_gone:  # the controller ends its side after term_exit
                with anyio.move_on_after(EXIT_DRAIN_S):
                    while await stream.receive() is not None:
                        pass
        except (StreamClosed, ConnectionLost):
            pass
        finally:
            await proc.close(CLOSE_GRACE_S)
            session.conn.forget_stream(stream.stream_id)
            if isinstance(proc, PipeSession):
                self._pipes.discard(proc)
            log.info(
                "terminal session %s ended: status %s (%s)",
                first.session_id,
                proc.returncode,
                relay.reason or "exited",
                extra={"event": "terminal-closed"},
            )


def _send(stream: MessageStream, message: Any, *, end: bool = False) -> bool:
    try:
        stream.send(message, end=end)
    except (ProtocolError, ConnectionLost, StreamClosed, RuntimeError) as exc:
        # RuntimeError: aioquic refuses data after our FIN (nothing more is owed then)
        log.debug("terminal stream %d: cannot send %s: %s", stream.stream_id, message.t, exc)
        return False
    return True


class _Relay:
    def __init__(self, stream: MessageStream, proc: Process, idle_timeout_s: float) -> None:
        self.stream = stream
        self.proc = proc
        self.idle_timeout_s = idle_timeout_s
        self.reason: str | None = None
        self.sent = 0  # output data bytes sent
        self.acked = 0  # ... of which the controller passed on
        self.window_open = anyio.Event()
        self.window_open.set()
        self.written = 0  # input data bytes written into the process
        self.written_acked = 0
        self.peer_gone = False

    async def run(self) -> None:
        stream, proc = self.stream, self.proc
        if not _send(stream, m.TermOpened(pid=proc.pid)):
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._input)
            tg.start_soon(self._idle)
            status = await self._output_until_exit()
            if not self.peer_gone:
                _send(stream, m.TermExit(status=status, reason=self.reason), end=True)
            tg.cancel_scope.cancel()

    async def _output_until_exit(self) -> int:
        proc = self.proc
        fds = (1, 2) if isinstance(proc, PipeSession) else (1,)
        drained = anyio.Event()
        left = len(fds)

        async def pump(fd: int) -> None:
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

    async def _pump(self, fd: int) -> None:
        proc = self.proc
        while True:
            while self.sent - self.acked >= WINDOW:
                self.window_open = anyio.Event()
                await self.window_open.wait()
            if isinstance(proc, PipeSession):
                data = await proc.read(fd, READ_CHUNK)
            else:
                data = await proc.read(READ_CHUNK)
            if not data:
                return
            self.sent += len(data)
            if not _send(self.stream, m.TermData(data=data, fd=fd)):
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
                if isinstance(msg, m.TermData):
                    try:
                        await proc.write(msg.data)
                    except TerminalClosed:
                        continue  # the process stopped reading; its exit will follow
                    self.written += len(msg.data)
                    if self.written - self.written_acked >= ACK_EVERY:
                        self.written_acked = self.written
                        _send(stream, m.TermAck(consumed=self.written))
                elif isinstance(msg, m.TermAck):
                    self.acked = max(self.acked, msg.consumed)
                    self.window_open.set()
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
        except (StreamClosed, ConnectionLost):
            self.peer_gone = True
            self.reason = self.reason or "the stream to the controller was lost"
            await proc.close(CLOSE_GRACE_S)

    async def _idle(self) -> None:
        def note(_: Any) -> None:
            self.reason = f"idle for {self.idle_timeout_s:g} s"

        await run_idle_watchdog(self.proc, self.idle_timeout_s, note)  # type: ignore[arg-type]


def install(agent: Agent) -> TerminalFeature:
    return TerminalFeature(agent)
