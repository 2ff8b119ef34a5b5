"""Terminals on the device: one controller-opened QUIC stream per session.

Theory of operation
-------------------
The controller opens the stream with ``term_open``. :class:`TerminalFeature` admits it against
the device's policy (terminals enabled, fewer than ``terminal_max_sessions`` open), checks the
operator's signed grant it must carry (``agent.terminal.grants``: the controller only relays
it) and starts
the command: with ``tty`` on a real pseudo-terminal of the requested size (``PtySession``),
without it on plain pipes (``PipeSession``), so a non-interactive ``exec`` gets stdout and
stderr apart and a real end of input. It answers ``error`` with the reason (and ends the
stream) when it refuses; otherwise ``agent.terminal.relay.TerminalRelay`` carries the session.

However the session ends (exit, operator close, stream reset, idle timeout, the connection
dropping, the agent stopping), the ``finally`` closes the PTY and kills the process group.
"""

from __future__ import annotations

import datetime as dt
import logging

import anyio

from agent.ports import AgentHost, LiveSession
from agent.terminal.command import TerminalError
from agent.terminal.grants import GrantChecker, RootOfTrust
from agent.terminal.manager import (
    DISABLED_REASON,
    TerminalManager,
    TerminalPolicy,
    TerminalRefused,
)
from agent.terminal.pipe_session import PipeSession
from agent.terminal.relay import (
    CLOSE_GRACE_S,
    EXIT_DRAIN_S,
    Process,
    TerminalRelay,
    send_message,
)
from agent.users import terminal_user
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode, StreamKind
from margo_stream.transport.connection import ConnectionLost, MessageStream, StreamClosed

log = logging.getLogger("margo.agent.terminal")


class TerminalFeature:
    """Serves ``StreamKind.TERMINAL`` streams within the device's terminal policy."""

    def __init__(self, agent: AgentHost, grants: GrantChecker) -> None:
        cfg = agent.config
        self.grants = grants
        enabled = cfg.terminal_enabled and cfg.terminal_max_sessions >= 1
        self.policy = TerminalPolicy(
            enabled=enabled,
            max_sessions=max(1, cfg.terminal_max_sessions),
            idle_timeout_s=cfg.terminal_idle_timeout,
            user=terminal_user(cfg),  # ConfigError if it cannot be used
        )
        self.manager = TerminalManager(self.policy)
        self._pipes: set[PipeSession] = set()
        self.counters = {"opened": 0, "refused": 0}
        agent.stream_handlers[StreamKind.TERMINAL] = self.handle_stream
        agent.shutdown_hooks.append(self.close_all)

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
        pipe = PipeSession.spawn(req.command, self.policy.shell, self.policy.user)
        self._pipes.add(pipe)
        return pipe

    async def close_all(self) -> None:
        await self.manager.close_all(grace_s=CLOSE_GRACE_S)
        for pipe in list(self._pipes):
            await pipe.close(CLOSE_GRACE_S)

    async def handle_stream(self, session: LiveSession, stream: MessageStream) -> None:
        first = await stream.receive()
        if not isinstance(first, m.TermOpen):
            stream.reset(ErrorCode.PROTOCOL_ERROR)
            return
        what = " ".join(first.command) if first.command else "login shell"
        try:
            self._admit()  # first: a session the policy refuses spends no grant
            grant = self.grants.check(first, dt.datetime.now(dt.UTC), session.ack.root)
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
            send_message(
                stream, m.Error(code=ErrorCode.TERMINAL_REFUSED, reason=reason[:1024]), end=True
            )
            return
        self.counters["opened"] += 1
        log.info(
            "terminal session %s started for operator %s (%s, pid %d, %s)",
            first.session_id,
            grant.operator.name,
            what,
            proc.pid,
            "pty" if first.tty else "pipes",
            extra={"event": "terminal-opened"},
        )
        relay = TerminalRelay(stream, proc, self.policy.idle_timeout_s, grant.operator.name)
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


def install(agent: AgentHost, trust: RootOfTrust) -> TerminalFeature:
    """Terminals whose grants are checked against ``trust`` (the device's root metadata)."""
    grants = GrantChecker(agent.device_id, trust, agent.config.state)
    return TerminalFeature(agent, grants)
