"""What both kinds of terminal session share: their errors, the command line and clean login
environment a session runs with, and writing all of a buffer into a non-blocking descriptor.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Callable, Mapping

import anyio

from agent.users import RunAs
from margo_stream.errors import MargoError

DEFAULT_TERM = "xterm-256color"
_FALLBACK_SHELL = "/bin/sh"


class TerminalError(MargoError):
    """A terminal session could not be started or used; the message says why."""


class TerminalClosed(TerminalError):
    """The terminal session was closed (by :meth:`PtySession.close`) and cannot be used."""


def login_shell(user: RunAs | None = None) -> str:
    """``user``'s (default: the current user's) login shell from the password database, or
    ``/bin/sh``. A user whose shell is ``nologin`` gets that: no interactive login."""
    if user is not None:
        shell = user.shell
    else:
        try:
            shell = pwd.getpwuid(os.getuid()).pw_shell
        except KeyError:  # uid without a passwd entry (common in containers)
            shell = ""
    if shell and os.path.isabs(shell) and os.access(shell, os.X_OK):
        return shell
    return _FALLBACK_SHELL


def _user_env(shell: str, user: RunAs | None) -> dict[str, str]:
    """A clean login environment, like sshd builds: the agent's own variables do not leak.
    HOME, USER and LOGNAME are ``user``'s (default: the current user's)."""
    if user is None:
        user = RunAs.current()
    env = {
        "HOME": user.home,
        "USER": user.name,
        "LOGNAME": user.name,
        "SHELL": shell,
        "PATH": os.environ.get("PATH", os.defpath),
    }
    for key in ("LANG", "LC_ALL", "TZ"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def resolve_command(
    command: list[str] | None,
    shell: str | None,
    env: Mapping[str, str] | None,
    user: RunAs | None = None,
) -> tuple[str, list[str], dict[str, str]]:
    """Return (executable path, argv, environment) for the child, which runs as ``user``
    (``None``: the current user)."""
    if command is None:
        path = shell or login_shell(user)
        if not (os.path.isabs(path) and os.access(path, os.X_OK)):
            raise TerminalError(f"login shell {path!r} is not an executable absolute path")
        # A leading "-" in argv[0] is how every Unix shell is told it is a login shell.
        argv = ["-" + os.path.basename(path)]
    else:
        if not command or not all(isinstance(arg, str) for arg in command):
            raise TerminalError("terminal command must be a non-empty list of strings")
        argv = list(command)
        path = argv[0]
    child_env = _user_env(path, user) if env is None else dict(env)
    child_env.setdefault("TERM", DEFAULT_TERM)
    if "/" not in path:
        found = shutil.which(path, path=child_env.get("PATH", os.defpath))
        if found is None:
            raise TerminalError(f"command not found: {path!r}")
        path = found
    return path, argv, child_env


def home_or_root(env: Mapping[str, str]) -> str:
    """The working directory a session starts in: ``HOME`` if it is a directory, else ``/``."""
    home = env.get("HOME", "")
    return home if home and os.path.isdir(home) else "/"


async def write_all(
    fd_of: Callable[[], int | None],
    data: bytes,
    *,
    closed: str,
    hangup_errno: int,
    hangup: str,
    failed: str,
    written: Callable[[int], None],
) -> None:
    """Write all of ``data`` to the non-blocking descriptor ``fd_of()`` names (``None``: closed,
    asked again after every wait), waiting while the kernel buffer is full; ``written(n)``
    after each write. ``TerminalClosed`` with ``closed`` or, on ``hangup_errno``, ``hangup``;
    ``TerminalError`` with ``failed`` on any other error."""
    view = memoryview(data).cast("B")
    while view:
        fd = fd_of()
        if fd is None:
            raise TerminalClosed(closed)
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            try:
                await anyio.wait_writable(fd)
            except anyio.ClosedResourceError:
                raise TerminalClosed(closed) from None
            continue
        except OSError as exc:
            if exc.errno == hangup_errno:
                raise TerminalClosed(hangup) from exc
            raise TerminalError(f"{failed}: {exc}") from exc
        view = view[n:]
        written(n)
