"""Real pseudo-terminal sessions on the device.

Theory of operation
-------------------
A :class:`PtySession` is one child process running on the slave side of a pseudo-terminal
pair from :func:`os.openpty`. The child is forked by :meth:`PtySession.spawn` and, before it
execs, it

* starts a new session (``setsid``) so it is a session and process-group leader with no
  controlling terminal,
* makes the slave its controlling terminal (``TIOCSCTTY``) and its stdin, stdout and stderr,
* resets signal dispositions and the signal mask the agent may have changed (an ignored
  ``SIGHUP`` or ``SIGPIPE`` would otherwise survive ``exec``),
* when it runs as another user (``user``): hands the slave to that user, as ``login`` does,
  and drops to the user's primary group with no supplementary groups and then to its uid,
* sets umask 022 (the agent's own is 077) and changes to the working directory as that user.

The window size is set on the pair with ``TIOCSWINSZ`` before the fork, so the program sees
the right size from its first instruction. Exec failures (no such file, bad directory) travel
back on a close-on-exec pipe, so :meth:`spawn` raises :class:`TerminalError` instead of
returning a session that dies at once.

The agent keeps only the master end, in non-blocking mode, and every read and write waits
for readiness through anyio (:func:`anyio.wait_readable` / :func:`anyio.wait_writable`):
no thread per session. The child's exit is awaited on a pidfd (Linux 5.3+) or, where there is
none, by polling ``waitpid(WNOHANG)`` with a short back-off.

The API is bytes in, bytes out, plus :meth:`resize` and :meth:`close`; it knows nothing of
QUIC, WebSockets or message framing, so any transport can carry a session.

Counters: ``bytes_in`` counts bytes written *into* the terminal (operator keystrokes),
``bytes_out`` counts bytes read *out of* it (program output).

Exit status convention (same as :mod:`subprocess`): a non-negative exit code for a normal
exit, ``-N`` when the child was killed by signal ``N``.

End of output: :meth:`read` returns ``b""`` once every holder of the slave end has gone (the
kernel then fails master reads with ``EIO``). A background process that keeps the terminal
open keeps the output open too, exactly as over ssh; :meth:`close` ends all of it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import struct
import termios
import time
from collections.abc import Callable, Mapping
from typing import NoReturn

import anyio

from agent.terminal.command import (
    DEFAULT_TERM,
    TerminalClosed,
    TerminalError,
    home_or_root,
    login_shell,
    resolve_command,
    write_all,
)
from agent.users import RunAs

__all__ = [
    "DEFAULT_TERM",
    "PtySession",
    "TerminalClosed",
    "TerminalError",
    "login_shell",
]

log = logging.getLogger(__name__)

_MAX_DIMENSION = 0xFFFF  # struct winsize holds unsigned shorts
_KILL_REAP_TIMEOUT_S = 5.0  # how long close() waits for a SIGKILLed group to disappear

# Dispositions the agent (or Python itself: SIGPIPE, SIGXFSZ) may have changed and that must
# not leak into the operator's shell. exec resets caught signals but keeps ignored ones.
_RESET_SIGNALS = tuple(
    getattr(signal, name)
    for name in (
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGTERM",
        "SIGPIPE",
        "SIGXFSZ",
        "SIGCHLD",
        "SIGWINCH",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGUSR1",
        "SIGUSR2",
        "SIGALRM",
    )
    if hasattr(signal, name)
)


def _check_size(rows: int, cols: int) -> None:
    for name, value in (("rows", rows), ("cols", cols)):
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not (1 <= value <= _MAX_DIMENSION)
        ):
            raise TerminalError(
                f"invalid terminal size: {name}={value!r} (must be an integer 1..{_MAX_DIMENSION})"
            )


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _exec_child(
    path: str,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    slave_fd: int,
    err_fd: int,
    user: RunAs | None,
) -> NoReturn:
    """Runs in the forked child: become a session leader on the slave, then exec."""
    step = "prepare file descriptors"
    try:
        # An agent started with stdio closed gets fds 0-2 from openpty()/pipe(): move them
        # above 2 first, so the dup2 calls below neither clobber nor no-op on them.
        if err_fd <= 2:
            err_fd = fcntl.fcntl(err_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        if slave_fd <= 2:
            slave_fd = fcntl.fcntl(slave_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        for sig in _RESET_SIGNALS:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        step = "setsid"
        os.setsid()
        step = "set controlling terminal"
        fcntl.ioctl(slave_fd, termios.TIOCSCTTY, 0)
        step = "redirect stdio"
        for fd in (0, 1, 2):
            os.dup2(slave_fd, fd)  # dup2 makes the copies inheritable
        os.close(slave_fd)
        if user is not None and user.switches:
            step = f"switch to user {user.name}"
            os.fchown(0, user.uid, -1)  # the terminal is the user's, as after a login
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
        os.umask(0o022)
        step = f"chdir to {cwd!r}"
        os.chdir(cwd)
        step = f"exec {path!r}"
        os.execve(path, argv, env)
    except BaseException as exc:  # noqa: B036 - the child must never return into the agent
        try:
            code = getattr(exc, "errno", None) or 0
            os.write(err_fd, f"{code}\0{step}\0{exc}".encode(errors="replace"))
        finally:
            os._exit(127)
    os._exit(127)  # not reached: execve does not return


class PtySession:
    """One process on a real pseudo-terminal. Create with :meth:`spawn`; end with :meth:`close`."""

    def __init__(
        self, pid: int, master_fd: int, pidfd: int | None, argv: list[str], rows: int, cols: int
    ) -> None:
        self._pid = pid
        self._pgid = pid  # the child called setsid(): it leads its session and process group
        self._master_fd: int | None = master_fd
        self._pidfd = pidfd
        self._argv = argv
        self._rows, self._cols = rows, cols
        self._returncode: int | None = None
        self._eof = False
        self._closing = False
        self._closed = anyio.Event()
        self._close_callbacks: list[Callable[[PtySession], object]] = []
        self._read_lock = anyio.Lock()
        self._write_lock = anyio.Lock()
        self._wait_lock = anyio.Lock()
        self._bytes_in = 0
        self._bytes_out = 0
        self._last_activity = time.monotonic()

    # ----------------------------------------------------------------------------- creation

    @classmethod
    async def spawn(
        cls,
        command: list[str] | None,
        *,
        rows: int,
        cols: int,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        shell: str | None = None,
        user: RunAs | None = None,
    ) -> PtySession:
        """Start ``command`` (argv list) on a new pseudo-terminal of ``rows`` x ``cols``.

        ``command=None`` starts a login shell: ``shell`` if given, else the user's shell from
        the password database (``/bin/sh`` if it has none). ``env=None`` gives a clean login
        environment (HOME, USER, LOGNAME, SHELL, PATH, LANG/LC_ALL/TZ if set); a mapping is
        used as the whole environment. ``TERM`` defaults to ``xterm-256color`` either way.
        ``cwd=None`` means the user's home directory (``HOME`` of the child environment).
        ``user``: who the program runs as (``None``: the agent's user).
        Raises :class:`TerminalError` if the program cannot be started.
        """
        _check_size(rows, cols)
        path, argv, child_env = resolve_command(command, shell, env, user)
        if cwd is None:
            cwd = home_or_root(child_env)

        master_fd, slave_fd = os.openpty()  # both close-on-exec
        err_r = err_w = -1
        pid = -1
        try:
            _set_winsize(master_fd, rows, cols)
            err_r, err_w = os.pipe()  # close-on-exec: EOF on err_r means exec succeeded
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child side, ends in exec or _exit
                _exec_child(path, argv, child_env, cwd, slave_fd, err_w, user)
        except BaseException:
            for fd in (master_fd, slave_fd, err_r, err_w):
                if fd >= 0:
                    os.close(fd)
            raise
        os.close(slave_fd)
        os.close(err_w)
        os.set_blocking(master_fd, False)
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        session = cls(pid, master_fd, pidfd, argv, rows, cols)

        try:
            report = await _read_to_eof(err_r)
        except BaseException:
            os.close(err_r)
            with anyio.CancelScope(shield=True):
                await session.close(grace_s=0)
            raise
        os.close(err_r)
        if report:
            with anyio.CancelScope(shield=True):
                await session.close(grace_s=0)
            _code, _, rest = report.decode(errors="replace").partition("\0")
            step, _, message = rest.partition("\0")
            raise TerminalError(f"cannot start {argv[0]!r}: {step} failed: {message}")
        log.debug("terminal session pid=%d started: %r %dx%d", pid, argv, rows, cols)
        return session

    # ---------------------------------------------------------------------------- properties

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def pgid(self) -> int:
        return self._pgid

    @property
    def argv(self) -> list[str]:
        return list(self._argv)

    @property
    def bytes_in(self) -> int:
        """Bytes written into the terminal (input to the program)."""
        return self._bytes_in

    @property
    def bytes_out(self) -> int:
        """Bytes read out of the terminal (output of the program)."""
        return self._bytes_out

    @property
    def size(self) -> tuple[int, int]:
        """The last size set, as (rows, cols)."""
        return self._rows, self._cols

    @property
    def returncode(self) -> int | None:
        """Exit status once the child was reaped (see the module docstring), else ``None``."""
        return self._returncode

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has started."""
        return self._closing

    @property
    def last_activity(self) -> float:
        """:func:`time.monotonic` of the last byte read or written."""
        return self._last_activity

    def idle_seconds(self) -> float:
        """Seconds since the last byte went either way."""
        return time.monotonic() - self._last_activity

    def __repr__(self) -> str:
        state = "closed" if self._closing else f"rc={self._returncode}"
        return f"<PtySession pid={self._pid} argv={self._argv!r} {state}>"

    # ----------------------------------------------------------------------------- bytes I/O

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Read up to ``max_bytes`` of output; ``b""`` at end of output or after :meth:`close`."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        async with self._read_lock:
            while True:
                fd = self._master_fd
                if fd is None or self._eof:
                    return b""
                try:
                    data = os.read(fd, max_bytes)
                except BlockingIOError:
                    try:
                        await anyio.wait_readable(fd)
                    except anyio.ClosedResourceError:
                        return b""
                    continue
                except OSError as exc:
                    if exc.errno == errno.EIO:  # every slave holder is gone
                        self._eof = True
                        return b""
                    raise TerminalError(f"reading from the terminal failed: {exc}") from exc
                if not data:
                    self._eof = True
                    return b""
                self._bytes_out += len(data)
                self._last_activity = time.monotonic()
                return data

    async def write(self, data: bytes) -> None:
        """Write all of ``data`` to the terminal, waiting while the kernel buffer is full."""
        async with self._write_lock:
            await write_all(
                lambda: None if self._closing else self._master_fd,
                data,
                closed="the terminal session is closed",
                hangup_errno=errno.EIO,
                hangup="the terminal has hung up",
                failed="writing to the terminal failed",
                written=self._wrote,
            )

    def _wrote(self, n: int) -> None:
        self._bytes_in += n
        self._last_activity = time.monotonic()

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size; the kernel sends SIGWINCH to the foreground process group."""
        _check_size(rows, cols)
        fd = self._master_fd
        if fd is None or self._closing:
            raise TerminalClosed("the terminal session is closed")
        _set_winsize(fd, rows, cols)
        self._rows, self._cols = rows, cols

    # --------------------------------------------------------------------------- child exit

    def poll(self) -> int | None:
        """Reap the child if it has exited, without waiting; return its status or ``None``."""
        if self._returncode is None:
            try:
                pid, status = os.waitpid(self._pid, os.WNOHANG)
            except ChildProcessError:
                # Someone else reaped our child (a waitpid(-1) elsewhere in the process).
                log.warning("terminal child pid=%d was reaped elsewhere", self._pid)
                self._returncode = 255
            else:
                if pid != 0:
                    self._returncode = os.waitstatus_to_exitcode(status)
        return self._returncode

    async def wait(self) -> int:
        """Wait for the child to exit; returns ``code`` or ``-signal`` like :mod:`subprocess`."""
        if self._returncode is not None:
            return self._returncode
        async with self._wait_lock:
            delay = 0.005
            while self.poll() is None:
                pidfd = self._pidfd
                if pidfd is not None:
                    try:
                        await anyio.wait_readable(pidfd)
                    except anyio.ClosedResourceError:
                        pass
                else:
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 0.1)
            assert self._returncode is not None
            return self._returncode

    # ------------------------------------------------------------------------------ closing

    def add_close_callback(self, callback: Callable[[PtySession], object]) -> None:
        """Call ``callback(session)`` once when :meth:`close` finishes (at once if it has)."""
        if self._closed.is_set():
            callback(self)
        else:
            self._close_callbacks.append(callback)

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished."""
        await self._closed.wait()

    async def close(self, grace_s: float = 2.0) -> None:
        """End the session from our side; idempotent, and safe to call concurrently.

        Sends SIGHUP (with SIGCONT, so stopped jobs see it) to every process group of the
        child's session, waits up to ``grace_s`` for them to go, then SIGTERM and another
        ``grace_s``, then SIGKILL. Reaps the child and closes the master fd; pending and later
        :meth:`read` calls return ``b""``. Runs shielded from cancellation so nothing is left
        behind.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            with anyio.CancelScope(shield=True):
                await self._terminate(max(grace_s, 0.0))
        finally:
            self._release_fds()
            self._closed.set()
            callbacks, self._close_callbacks = self._close_callbacks, []
            for callback in callbacks:
                try:
                    callback(self)
                except Exception:
                    log.exception("terminal close callback failed")
            log.debug("terminal session pid=%d closed, status %s", self._pid, self._returncode)

    async def __aenter__(self) -> PtySession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _terminate(self, grace_s: float) -> None:
        steps = (
            (signal.SIGHUP, grace_s),
            (signal.SIGTERM, grace_s),
            (signal.SIGKILL, _KILL_REAP_TIMEOUT_S),
        )
        for sig, timeout in steps:
            if self.poll() is not None and not self._session_members():
                return
            self._signal_session(sig)
            if sig == signal.SIGHUP:
                self._signal_session(signal.SIGCONT)
            if await self._wait_quiet(timeout):
                return
        log.warning("terminal session pid=%d: processes survived SIGKILL", self._pid)

    async def _wait_quiet(self, timeout: float) -> bool:
        """Wait until the child is reaped and no process of its session is left."""
        with anyio.move_on_after(timeout):
            await self.wait()
            delay = 0.002
            while self._session_members():
                await anyio.sleep(delay)  # other session members are not our children
                delay = min(delay * 2, 0.05)
            return True
        return False

    def _session_members(self) -> dict[int, list[int]]:
        """Live processes of the child's session, by process group (Linux /proc scan).

        Job-control shells put background jobs in their own process groups, so signalling
        only the child's group would miss them. Without /proc, the child's group is used.
        """
        try:
            entries = os.listdir("/proc")
        except OSError:
            return {self._pgid: [self._pid]} if self._returncode is None else {}
        groups: dict[int, list[int]] = {}
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat_file:
                    stat = stat_file.read()
            except OSError:
                continue
            # Fields after the parenthesised command: state ppid pgrp session ...
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) < 4 or fields[0] in (b"Z", b"X"):
                continue
            if int(fields[3]) == self._pid:
                groups.setdefault(int(fields[2]), []).append(int(entry))
        return groups

    def _signal_session(self, sig: int) -> None:
        pgids = set(self._session_members())
        if self._returncode is None:
            pgids.add(self._pgid)
        for pgid in pgids:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _release_fds(self) -> None:
        for attr in ("_master_fd", "_pidfd"):
            fd = getattr(self, attr)
            if fd is None:
                continue
            setattr(self, attr, None)
            try:
                anyio.notify_closing(fd)  # wake readers/writers with ClosedResourceError
            except RuntimeError:
                pass  # no event loop running
            os.close(fd)


async def _read_to_eof(fd: int) -> bytes:
    """Read a (small) pipe to EOF without blocking the event loop."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            await anyio.wait_readable(fd)
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
