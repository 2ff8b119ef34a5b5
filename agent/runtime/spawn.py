"""Child processes for the process runtime, started with ``subprocess.Popen``.

The event loop's own subprocess support (uvloop's libuv) starts children with ``fork()``,
whose cost grows with the agent's memory: 15-17 ms with a few hundred MB resident, as while a
large telemetry backlog is indexed. CPython's ``subprocess`` uses ``vfork()`` and takes well
under a millisecond whatever the agent's size. The child's exit is awaited on a pidfd and its
output read from a non-blocking pipe, both through anyio, so no thread waits on a child.

Run as another user (``run_as`` that switches): the child drops to the user's uid and primary
group with no supplementary groups (``subprocess``'s ``user``/``group``/``extra_groups``)
between fork and exec. CPython then uses ``fork()``, not ``vfork()`` (changing ids in a child
that shares the parent's memory is unsafe), so the start cost grows with the agent's size again.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream

from agent.users import RunAs, popen_args


class PipeReader(ByteReceiveStream):
    """The read end of a pipe as an anyio byte stream."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                continue
            if not data:
                raise anyio.EndOfStream
            return data

    async def aclose(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class Child:
    """What the runtime needs of a running child: pid, output, exit status."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.pid = popen.pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(popen.pid)
        assert popen.stdout is not None
        self.stdout = PipeReader(os.dup(popen.stdout.fileno()))
        popen.stdout.close()
        self._popen = popen

    async def wait(self) -> int:
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self._popen.returncode = self.returncode  # so Popen never reaps it again
                break
            await anyio.wait_readable(self._pidfd)
        return self.returncode

    async def aclose(self) -> None:
        await self.stdout.aclose()
        if self._pidfd >= 0:
            fd, self._pidfd = self._pidfd, -1
            os.close(fd)


async def spawn(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], run_as: RunAs | None = None
) -> Child:
    """Start ``argv`` in its own session, stdout and stderr into one pipe, stdin empty, as
    ``run_as`` (``None``: as the agent).

    Raises ``FileNotFoundError`` / ``PermissionError`` / ``OSError`` as ``subprocess`` does."""
    popen = subprocess.Popen(  # noqa: S603 - the command is the signed deployment's
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=dict(env),
        start_new_session=True,
        close_fds=True,
        **popen_args(run_as),
    )
    return Child(popen)
