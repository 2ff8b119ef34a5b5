"""Admission and bookkeeping for the device's terminal sessions.

The :class:`TerminalManager` decides whether a new terminal may open (the device's
:class:`TerminalPolicy`), keeps the set of open :class:`~agent.terminal.pty_session.PtySession`
objects, and frees a slot when a session is closed. A slot is held from :meth:`open` until the
session's :meth:`~agent.terminal.pty_session.PtySession.close` finishes, so whoever carries a
session (the QUIC terminal stream) must close it when the stream ends, normally in a
``finally``; the child having exited is not enough, since its fd is still open.

:func:`run_idle_watchdog` closes a session when no byte has gone either way for a while; run
it in the same task group as the session's pumps.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio

from agent.users import RunAs
from margo_stream.errors import ConfigError

from .pty_session import PtySession, TerminalError

__all__ = [
    "TerminalManager",
    "TerminalPolicy",
    "TerminalRefused",
    "run_idle_watchdog",
]

log = logging.getLogger(__name__)

DISABLED_REASON = "terminal access is disabled on this device"

OnTimeout = Callable[[PtySession], Awaitable[None] | None]


class TerminalRefused(TerminalError):
    """The device's policy refused a new terminal session; ``reason`` is safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TerminalPolicy:
    """What the device allows. ``shell=None`` means the user's login shell; ``user`` is who
    sessions run as (``None``: the agent's own user)."""

    enabled: bool = True
    max_sessions: int = 4
    idle_timeout_s: float = 900.0
    shell: str | None = None
    user: RunAs | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_sessions, bool)
            or not isinstance(self.max_sessions, int)
            or (self.max_sessions < 1)
        ):
            raise ConfigError(
                f"terminal max_sessions must be an integer >= 1, not {self.max_sessions!r} "
                "(set enabled to false to turn terminals off)"
            )
        if not self.idle_timeout_s > 0:
            raise ConfigError(
                f"terminal idle_timeout_s must be > 0 seconds, not {self.idle_timeout_s!r}"
            )
        if self.shell is not None and not self.shell.startswith("/"):
            raise ConfigError(f"terminal shell must be an absolute path, not {self.shell!r}")


class TerminalManager:
    """Opens terminal sessions within the policy and tracks them until they close."""

    def __init__(self, policy: TerminalPolicy | None = None) -> None:
        self._policy = policy if policy is not None else TerminalPolicy()
        self._sessions: dict[int, PtySession] = {}  # by pid, in opening order
        self._starting = 0  # slots reserved by open() calls still spawning

    @property
    def policy(self) -> TerminalPolicy:
        return self._policy

    def update_policy(self, policy: TerminalPolicy) -> None:
        """Apply a new policy to later :meth:`open` calls; open sessions are left alone."""
        self._policy = policy

    @property
    def sessions(self) -> tuple[PtySession, ...]:
        """Sessions opened and not yet closed."""
        return tuple(self._sessions.values())

    @property
    def active_count(self) -> int:
        """Slots in use: open sessions plus sessions being started."""
        return len(self._sessions) + self._starting

    def check_admission(self) -> None:
        """Raise :class:`TerminalRefused` if :meth:`open` would be refused right now."""
        policy = self._policy
        if not policy.enabled:
            raise TerminalRefused(DISABLED_REASON)
        in_use = self.active_count
        if in_use >= policy.max_sessions:
            raise TerminalRefused(
                f"{in_use} terminal sessions already open (limit {policy.max_sessions})"
            )

    async def open(
        self,
        command: list[str] | None,
        rows: int,
        cols: int,
        env: Mapping[str, str] | None = None,
        *,
        cwd: str | None = None,
    ) -> PtySession:
        """Start a session (``command=None``: the policy's shell or the login shell).

        Raises :class:`TerminalRefused` when the policy says no, :class:`TerminalError` when
        the program cannot be started.
        """
        self.check_admission()
        self._starting += 1  # reserve the slot across the await below
        try:
            session = await PtySession.spawn(
                command,
                rows=rows,
                cols=cols,
                env=env,
                cwd=cwd,
                shell=self._policy.shell,
                user=self._policy.user,
            )
        finally:
            self._starting -= 1
        self._sessions[session.pid] = session
        session.add_close_callback(self._release)
        log.info(
            "terminal session opened: pid=%d argv=%r (%d open)",
            session.pid,
            session.argv,
            len(self._sessions),
        )
        return session

    def _release(self, session: PtySession) -> None:
        if self._sessions.get(session.pid) is session:
            del self._sessions[session.pid]
            log.info(
                "terminal session closed: pid=%d status=%s (%d open)",
                session.pid,
                session.returncode,
                len(self._sessions),
            )

    async def run_idle_watchdog(
        self, session: PtySession, on_timeout: OnTimeout | None = None
    ) -> bool:
        """:func:`run_idle_watchdog` with the policy's ``idle_timeout_s``."""
        return await run_idle_watchdog(session, self._policy.idle_timeout_s, on_timeout)

    async def close_all(self, grace_s: float = 2.0) -> None:
        """Close every open session, concurrently, and wait until all are closed."""
        sessions = self.sessions
        if not sessions:
            return
        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(session.close, grace_s)


async def run_idle_watchdog(
    session: PtySession, idle_timeout_s: float, on_timeout: OnTimeout | None = None
) -> bool:
    """Close ``session`` once no byte has gone either way for ``idle_timeout_s`` seconds.

    ``on_timeout(session)`` (plain or async) is called first, e.g. to tell the operator why;
    the session is closed even if it raises. Returns ``True`` if the watchdog closed the
    session, ``False`` if the session was closed by someone else first.
    """
    if not idle_timeout_s > 0:
        raise ValueError("idle_timeout_s must be positive")
    while not session.closed:
        remaining = idle_timeout_s - session.idle_seconds()
        if remaining <= 0:
            log.info(
                "terminal session pid=%d idle for %.0f s: closing", session.pid, idle_timeout_s
            )
            try:
                if on_timeout is not None:
                    result = on_timeout(session)
                    if inspect.isawaitable(result):
                        await result
            finally:
                await session.close()
            return True
        with anyio.move_on_after(remaining):
            await session.wait_closed()
    return False
