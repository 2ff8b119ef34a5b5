"""The typed seams between the agent and its features.

Each feature (desired state, status, telemetry, terminals) depends on these protocols, never
on ``agent.service.Agent`` or ``agent.session.AgentSession``: ``agent/features.py`` builds the
one :class:`AgentSetup` at start-up, hands it to every feature, then gives it to the ``Agent``
that runs the connect loop. This module imports nothing of the agent but its configuration,
so any module may depend on it.

The protocols
-------------

``AgentHost``: what a feature gets when it is installed.
    ``config`` (``AgentConfig``), ``creds`` (``DeviceCredentials``), ``device_id``, ``tenant``,
    and where it plugs in (lists and a dict it appends to, before the agent starts):
    ``stream_handlers[kind] = handler``  a ``StreamHandler`` for a controller-opened stream kind;
    ``session_tasks.append(task)``       a ``SessionTask`` run in every session, cancelled
                                         when the link drops;
    ``background_tasks.append(task)``    a ``BackgroundTask`` run for the whole process, online
                                         or not;
    ``hello_fields.append(fields)``      a ``HelloFields``: keyword fields of every hello;
    ``shutdown_hooks.append(hook)``      a ``ShutdownHook`` awaited (shielded) when the agent
                                         stops.

``LiveSession``: what a feature gets of one live session (the hello was answered).
    ``conn`` (a ``StreamLink``: ``open_stream()``, ``forget_stream(stream_id)``),
    ``ack`` (the controller's ``HelloAck``), ``send_stats(values)`` (counters on the control
    stream).

Callables: ``StreamHandler = (LiveSession, MessageStream) -> Awaitable[None]``,
``SessionTask = (LiveSession) -> Awaitable[None]``, ``BackgroundTask = () -> Coroutine`` (an
``async def``), ``ShutdownHook = () -> Awaitable[None]``, ``HelloFields = () -> dict[str, Any]``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.config import AgentConfig
from margo_stream.identity.trust import DeviceCredentials
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import StreamKind
from margo_stream.transport.connection import MessageStream


class StreamLink(Protocol):
    """The connection as a feature uses it: its own streams."""

    def open_stream(self) -> MessageStream: ...

    def forget_stream(self, stream_id: int) -> None: ...


class LiveSession(Protocol):
    """One connection whose hello was answered; gone when the link drops."""

    @property
    def conn(self) -> StreamLink: ...

    @property
    def ack(self) -> m.HelloAck: ...

    def send_stats(self, values: dict[str, Any]) -> None: ...


StreamHandler = Callable[[LiveSession, MessageStream], Awaitable[None]]
SessionTask = Callable[[LiveSession], Awaitable[None]]
BackgroundTask = Callable[[], Coroutine[Any, Any, None]]  # started with start_soon
ShutdownHook = Callable[[], Awaitable[None]]
HelloFields = Callable[[], dict[str, Any]]


class AgentHost(Protocol):
    """What a feature needs of the agent: who it is and where to plug in."""

    @property
    def config(self) -> AgentConfig: ...

    @property
    def creds(self) -> DeviceCredentials: ...

    @property
    def device_id(self) -> str: ...

    @property
    def tenant(self) -> str: ...

    @property
    def stream_handlers(self) -> dict[StreamKind, StreamHandler]: ...

    @property
    def session_tasks(self) -> list[SessionTask]: ...

    @property
    def background_tasks(self) -> list[BackgroundTask]: ...

    @property
    def hello_fields(self) -> list[HelloFields]: ...

    @property
    def shutdown_hooks(self) -> list[ShutdownHook]: ...


@dataclass(slots=True, eq=False)
class AgentSetup:
    """The agent's one ``AgentHost``: its identity and what its features plugged in."""

    config: AgentConfig
    creds: DeviceCredentials
    stream_handlers: dict[StreamKind, StreamHandler] = field(default_factory=dict)
    session_tasks: list[SessionTask] = field(default_factory=list)
    background_tasks: list[BackgroundTask] = field(default_factory=list)
    hello_fields: list[HelloFields] = field(default_factory=list)
    shutdown_hooks: list[ShutdownHook] = field(default_factory=list)

    @property
    def device_id(self) -> str:
        return self.creds.device_id

    @property
    def tenant(self) -> str:
        return self.creds.tenant
