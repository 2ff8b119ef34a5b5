"""A command on pipes, without a terminal: what a non-interactive ``exec`` runs.

Stdout and stderr stay apart and the command gets a real end of input. The process runs in
its own process group; :meth:`PipeSession.close` ends the whole group (SIGHUP, SIGTERM,
SIGKILL) and reaps it, however the session ended.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import anyio

from agent.terminal.command import TerminalError, home_or_root, resolve_command, write_all
from agent.users import RunAs, popen_args

READ_CHUNK = 32 * 1024


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
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self._files = {0: proc.stdin, 1: proc.stdout, 2: proc.stderr}
        self._fds: dict[int, int | None] = {}
        for fd, f in self._files.items():
            os.set_blocking(f.fileno(), False)
            self._fds[fd] = f.fileno()

    @classmethod
    def spawn(
        cls, command: list[str] | None, shell: str | None, user: RunAs | None = None
    ) -> PipeSession:
        """Start ``command`` (``None``: the login shell) as ``user`` (``None``: the agent's)."""
        path, argv, env = resolve_command(command, shell, None, user)
        try:
            proc = subprocess.Popen(  # noqa: S603 - the operator's command, on purpose
                argv,
                executable=path,
                env=env,
                cwd=home_or_root(env),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                **popen_args(user),
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
        self._files[fd].close()

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
