"""TerminalManager admission, slot accounting and the idle watchdog, with real PTYs."""

from __future__ import annotations

import anyio
import pytest

from agent.terminal.manager import (
    TerminalManager,
    TerminalPolicy,
    TerminalRefused,
    run_idle_watchdog,
)
from agent.terminal.pty_session import PtySession, TerminalError
from margo_stream.errors import ConfigError, MargoError

pytestmark = pytest.mark.anyio

TIMEOUT_S = 5.0
CAT = ["cat"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_refuses_when_disabled() -> None:
    manager = TerminalManager(TerminalPolicy(enabled=False))
    with pytest.raises(TerminalRefused) as info:
        await manager.open(CAT, 24, 80)
    assert info.value.reason == "terminal access is disabled on this device"
    assert isinstance(info.value, MargoError)
    assert manager.active_count == 0


async def test_refuses_at_the_limit_and_frees_the_slot_on_close() -> None:
    manager = TerminalManager(TerminalPolicy(max_sessions=2))
    first = await manager.open(CAT, 24, 80)
    second = await manager.open(CAT, 24, 80)
    try:
        assert manager.sessions == (first, second)
        with pytest.raises(TerminalRefused) as info:
            await manager.open(CAT, 24, 80)
        assert info.value.reason == "2 terminal sessions already open (limit 2)"

        await first.close()
        assert manager.sessions == (second,)
        third = await manager.open(CAT, 24, 80)
        assert manager.active_count == 2
    finally:
        with anyio.fail_after(TIMEOUT_S):
            await manager.close_all()
    assert manager.sessions == ()
    assert second.closed and third.closed


async def test_concurrent_opens_cannot_exceed_the_limit() -> None:
    manager = TerminalManager(TerminalPolicy(max_sessions=1))
    opened: list[PtySession] = []
    refused: list[str] = []

    async def try_open() -> None:
        try:
            opened.append(await manager.open(CAT, 24, 80))
        except TerminalRefused as exc:
            refused.append(exc.reason)

    try:
        with anyio.fail_after(TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(try_open)
        assert len(opened) == 1
        assert refused == ["1 terminal sessions already open (limit 1)"] * 2
    finally:
        await manager.close_all()


async def test_failed_spawn_releases_its_reservation() -> None:
    manager = TerminalManager(TerminalPolicy(max_sessions=1))
    with pytest.raises(TerminalError, match="command not found"):
        await manager.open(["no-such-command-here"], 24, 80)
    assert manager.active_count == 0
    session = await manager.open(CAT, 24, 80)
    await session.close()
    assert manager.active_count == 0


async def test_policy_shell_is_used_for_login_sessions(tmp_path) -> None:
    manager = TerminalManager(TerminalPolicy(shell="/bin/sh"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PS1": "$ "}
    session = await manager.open(None, 24, 80, env)
    try:
        assert session.argv == ["-sh"]
    finally:
        await manager.close_all()


async def test_idle_watchdog_closes_an_idle_session() -> None:
    manager = TerminalManager(TerminalPolicy(idle_timeout_s=0.2))
    session = await manager.open(CAT, 24, 80)
    notified: list[PtySession] = []

    async def on_timeout(s: PtySession) -> None:
        notified.append(s)
        await s.write(b"closing: idle\n")  # e.g. tell the operator; the session still works

    with anyio.fail_after(TIMEOUT_S):
        assert await manager.run_idle_watchdog(session, on_timeout) is True
        await session.wait_closed()
    assert notified == [session]
    assert session.closed and manager.active_count == 0


async def test_idle_watchdog_stops_when_session_closed_by_someone_else() -> None:
    session = await PtySession.spawn(CAT, rows=24, cols=80)
    result: list[bool] = []

    async def watch() -> None:
        result.append(await run_idle_watchdog(session, 900.0, None))

    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.wait_all_tasks_blocked()
            await session.close()
    assert result == [False]


async def test_bytes_either_way_count_as_activity() -> None:
    session = await PtySession.spawn(CAT, rows=24, cols=80)
    idle_before = session.idle_seconds()
    await session.write(b"x")
    assert session.idle_seconds() <= idle_before
    assert session.bytes_in == 1
    with anyio.fail_after(TIMEOUT_S):
        assert await session.read() == b"x"  # the terminal echoes it
    assert session.bytes_out == 1
    await session.close()


def test_policy_validation() -> None:
    assert TerminalPolicy() == TerminalPolicy(True, 4, 900.0, None)
    with pytest.raises(ConfigError, match="max_sessions"):
        TerminalPolicy(max_sessions=0)
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        TerminalPolicy(idle_timeout_s=0)
    with pytest.raises(ConfigError, match="absolute"):
        TerminalPolicy(shell="bash")
