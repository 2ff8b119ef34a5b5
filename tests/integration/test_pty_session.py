"""PtySession and the operator-side tty helpers on real pseudo-terminals (no mocks).

Synchronisation is by reading until the expected bytes arrive, under ``anyio.fail_after``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import termios

import anyio
import pytest

from agent.terminal.pty_session import PtySession, TerminalClosed, TerminalError
from margo_stream.cli.tty import get_winsize, raw_mode, set_winsize, winsize_changes

pytestmark = pytest.mark.anyio

TIMEOUT_S = 5.0


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict]:
    return request.param


def shell_env(tmp_path: os.PathLike[str]) -> dict[str, str]:
    """A plain interactive ``sh``: no rc files (ENV unset), a known prompt."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": os.fspath(tmp_path),
        "PS1": "$ ",
        "LANG": "C",
    }


async def read_until(session: PtySession, needle: bytes, buf: bytearray | None = None) -> bytes:
    """Read until ``needle`` has been seen; return everything read so far."""
    buf = bytearray() if buf is None else buf
    with anyio.fail_after(TIMEOUT_S):
        while needle not in buf:
            data = await session.read()
            if not data:
                raise AssertionError(f"EOF before {needle!r}; got {bytes(buf)!r}")
            buf += data
    return bytes(buf)


async def read_to_eof(session: PtySession) -> bytes:
    buf = bytearray()
    with anyio.fail_after(TIMEOUT_S):
        while data := await session.read():
            buf += data
    return bytes(buf)


async def read_until_match(
    session: PtySession, pattern: bytes, buf: bytearray | None = None
) -> bytes:
    """Read until the regular expression ``pattern`` matches what was read (DOTALL)."""
    buf = bytearray() if buf is None else buf
    regex = re.compile(pattern, re.DOTALL)
    with anyio.fail_after(TIMEOUT_S):
        while not regex.search(buf):
            data = await session.read()
            if not data:
                raise AssertionError(f"EOF before {pattern!r}; got {bytes(buf)!r}")
            buf += data
    return bytes(buf)


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (os.kill(pid, 0) succeeds on zombies)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


# ------------------------------------------------------------------------------ PtySession


async def test_output_and_exit_status() -> None:
    session = await PtySession.spawn(["sh", "-c", "echo hello; exit 3"], rows=24, cols=80)
    try:
        output = await read_to_eof(session)
        assert b"hello" in output
        with anyio.fail_after(TIMEOUT_S):
            assert await session.wait() == 3
        assert session.bytes_out == len(output)
        assert session.pgid == session.pid
    finally:
        await session.close()
    assert session.returncode == 3


async def test_killed_by_signal_is_negative() -> None:
    async with await PtySession.spawn(
        ["sh", "-c", "echo ready; kill -TERM $$"], rows=24, cols=80
    ) as session:
        await read_to_eof(session)
        with anyio.fail_after(TIMEOUT_S):
            assert await session.wait() == -signal.SIGTERM


async def test_terminal_environment_and_controlling_tty() -> None:
    script = 'echo "term=$TERM size=$(stty size)"; echo ctty-ok > /dev/tty'
    async with await PtySession.spawn(["sh", "-c", script], rows=31, cols=97) as session:
        output = await read_to_eof(session)
        assert b"term=xterm-256color size=31 97" in output
        assert b"ctty-ok" in output  # /dev/tty opens only with a controlling terminal
        with anyio.fail_after(TIMEOUT_S):
            assert await session.wait() == 0


async def test_interactive_shell_echoes_input(tmp_path: os.PathLike[str]) -> None:
    async with await PtySession.spawn(["sh"], rows=24, cols=80, env=shell_env(tmp_path)) as s:
        buf = bytearray(await read_until(s, b"$ "))
        await s.write(b"echo answer=$((6*7))\n")
        output = await read_until(s, b"answer=42\r\n", buf)
        assert b"echo answer=$((6*7))" in output  # the terminal echoed what we typed
        assert s.bytes_in == len(b"echo answer=$((6*7))\n")
        await s.write(b"exit 5\n")
        await read_to_eof(s)
        with anyio.fail_after(TIMEOUT_S):
            assert await s.wait() == 5


async def test_resize_is_seen_by_stty(tmp_path: os.PathLike[str]) -> None:
    async with await PtySession.spawn(["sh"], rows=24, cols=80, env=shell_env(tmp_path)) as s:
        buf = bytearray(await read_until(s, b"$ "))
        s.resize(40, 120)
        assert s.size == (40, 120)
        await s.write(b"stty size\n")
        await read_until(s, b"40 120\r\n", buf)


async def test_login_shell_when_command_is_none(tmp_path: os.PathLike[str]) -> None:
    async with await PtySession.spawn(
        None, rows=24, cols=80, env=shell_env(tmp_path), shell="/bin/sh"
    ) as s:
        assert s.argv == ["-sh"]
        await s.write(b"echo zero=$0\n")
        await read_until(s, b"zero=-sh\r\n")


async def test_close_kills_whole_process_group() -> None:
    script = 'sleep 1000 & echo "bg=$!"; sleep 1000 & echo "fg=$!"; wait'
    session = await PtySession.spawn(["sh", "-c", script], rows=24, cols=80)
    output = await read_until_match(session, rb"bg=(\d+)\r\n.*fg=(\d+)\r\n")
    pids = [int(pid) for pid in re.findall(rb"[bf]g=(\d+)", output)]
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    assert all(os.getpgid(pid) == session.pgid for pid in pids)

    with anyio.fail_after(TIMEOUT_S):
        await session.close()
    assert not alive(session.pid)
    for pid in pids:
        assert not alive(pid), f"sleep {pid} survived close()"
    assert session.returncode == -signal.SIGHUP
    await session.close()  # idempotent
    assert await session.read() == b""
    with pytest.raises(TerminalClosed):
        await session.write(b"x")
    with pytest.raises(TerminalClosed):
        session.resize(10, 10)


async def test_close_reaches_background_jobs_in_other_groups(tmp_path: os.PathLike[str]) -> None:
    # An interactive sh has job control: "&" puts the job in a process group of its own.
    session = await PtySession.spawn(["sh"], rows=24, cols=80, env=shell_env(tmp_path))
    buf = bytearray(await read_until(session, b"$ "))
    await session.write(b"sleep 1000 & echo job=$!\n")
    output = await read_until_match(session, rb"job=(\d+)\r\n", buf)
    job = int(re.search(rb"job=(\d+)\r\n", output)[1])
    assert alive(job) and os.getpgid(job) != session.pgid
    assert os.getsid(job) == session.pid

    with anyio.fail_after(TIMEOUT_S):
        await session.close()
    assert not alive(job)


async def test_close_escalates_to_sigkill() -> None:
    script = "trap '' HUP TERM; echo armored; while :; do sleep 1; done"
    session = await PtySession.spawn(["sh", "-c", script], rows=24, cols=80)
    await read_until(session, b"armored")
    with anyio.fail_after(TIMEOUT_S):
        await session.close(grace_s=0.2)
    assert session.returncode == -signal.SIGKILL
    assert not alive(session.pid)


async def test_close_wakes_a_pending_reader() -> None:
    session = await PtySession.spawn(["cat"], rows=24, cols=80)
    results: list[bytes] = []

    async def reader() -> None:
        results.append(await session.read())

    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            await session.close()
    assert results == [b""]


async def test_large_write_is_delivered_completely() -> None:
    # More than the kernel's PTY buffer: write() must cope with EAGAIN while cat echoes back.
    payload = b"".join(b"%07d\n" % i for i in range(20_000))  # 160 kB
    session = await PtySession.spawn(["sh", "-c", "stty raw -echo; echo go; cat"], rows=24, cols=80)
    try:
        await read_until(session, b"go")
        received = bytearray()

        async def drain() -> None:
            with anyio.fail_after(TIMEOUT_S * 2):
                while not received.endswith(b"%07d\n" % 19_999):
                    data = await session.read()
                    assert data, "EOF before all data came back"
                    received.extend(data)

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            with anyio.fail_after(TIMEOUT_S * 2):
                await session.write(payload)
        assert session.bytes_in == len(payload)
        start = received.index(b"0000000\n")
        assert bytes(received[start:]) == payload
    finally:
        await session.close()


async def test_spawn_errors_are_terminal_errors(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(TerminalError, match="command not found"):
        await PtySession.spawn(["no-such-command-here"], rows=24, cols=80)
    with pytest.raises(TerminalError, match="chdir"):
        await PtySession.spawn(["sh"], rows=24, cols=80, cwd=os.path.join(tmp_path, "missing"))
    with pytest.raises(TerminalError, match="invalid terminal size"):
        await PtySession.spawn(["sh"], rows=0, cols=80)
    with pytest.raises(TerminalError, match="non-empty"):
        await PtySession.spawn([], rows=24, cols=80)


CLOSED_STDIO_SCRIPT = """
import os, sys, anyio
from agent.terminal.pty_session import PtySession

async def main():
    for fd in (0, 1, 2):  # after the event loop took its fds, so openpty() gets these
        os.close(fd)
    session = await PtySession.spawn(["sh", "-c", "echo out; echo err >&2; exit 7"],
                                     rows=24, cols=80)
    output = b""
    while data := await session.read():
        output += data
    status = await session.wait()
    await session.close()
    with open(sys.argv[1], "w") as report:
        report.write(f"{status} {output!r}")

anyio.run(main)
"""


def test_spawn_from_a_process_with_closed_stdio(tmp_path: os.PathLike[str]) -> None:
    # An agent whose fds 0-2 are closed gets those numbers back from openpty()/pipe().
    report = os.path.join(tmp_path, "report")
    script = os.path.join(tmp_path, "closed_stdio.py")
    with open(script, "w") as script_file:
        script_file.write(CLOSED_STDIO_SCRIPT)
    completed = subprocess.run([sys.executable, script, report], timeout=TIMEOUT_S * 2)
    assert completed.returncode == 0
    with open(report) as report_file:
        assert report_file.read() == "7 b'out\\r\\nerr\\r\\n'"


# ------------------------------------------------------------------- operator tty helpers


def test_raw_mode_restores_attributes_after_exception() -> None:
    master, slave = os.openpty()
    try:
        saved = termios.tcgetattr(slave)
        assert saved[3] & termios.ICANON
        with pytest.raises(RuntimeError), raw_mode(slave):
            attrs = termios.tcgetattr(slave)
            assert not attrs[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
            assert not attrs[1] & termios.OPOST
            raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == saved

        with pytest.raises(KeyboardInterrupt), raw_mode(slave):
            raise KeyboardInterrupt
        assert termios.tcgetattr(slave) == saved

        with raw_mode(slave):
            pass
        assert termios.tcgetattr(slave) == saved
    finally:
        os.close(master)
        os.close(slave)


def test_raw_mode_is_a_no_op_on_a_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        ran = False
        with raw_mode(read_fd):
            ran = True
            os.write(write_fd, b"line\n")
            assert os.read(read_fd, 16) == b"line\n"  # bytes pass through untouched
        assert ran
        with pytest.raises(termios.error):  # still not a terminal: nothing was made of it
            termios.tcgetattr(read_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_get_winsize() -> None:
    master, slave = os.openpty()
    try:
        set_winsize(master, 33, 77)
        assert get_winsize(slave) == (33, 77)
    finally:
        os.close(master)
        os.close(slave)


async def test_winsize_changes_reports_sigwinch() -> None:
    master, slave = os.openpty()
    try:
        set_winsize(slave, 24, 80)
        with winsize_changes(slave) as sizes:
            assert sizes.current == (24, 80)
            set_winsize(master, 50, 132)
            os.kill(os.getpid(), signal.SIGWINCH)
            with anyio.fail_after(TIMEOUT_S):
                assert await sizes.__anext__() == (50, 132)
    finally:
        os.close(master)
        os.close(slave)
