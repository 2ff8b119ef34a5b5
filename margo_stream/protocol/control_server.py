"""The controller's end of the control stream, sans-IO: the hello, then small messages.

Theory of operation
-------------------
A verified connection must open its control stream with a hello within ``hello_timeout`` of
the handshake. :meth:`ControllerControl.timer` says when that time has run out
(:class:`HelloTimedOut`: close the connection); :attr:`~ControllerControl.deadline` is when to
call it. :meth:`ControllerControl.received` maps each control message to what the driver must
do: the hello becomes :class:`HelloReceived`, unless it names another device than the one
the verified certificate names (:class:`IdentityMismatch`: close the connection; the identity
is the certificate's, never the payload's); a ``ping`` becomes :class:`SendPong`, ``stats``
:class:`StatsReported` and an ``error`` :class:`PeerError`. Anything before the hello is
impossible (the stream table requires a hello to open the stream) and is ignored.

States (``ServerControlState``), as a table of (state, input) -> state::

    AWAITING_HELLO  hello naming the certificate's device  -> OPEN
    AWAITING_HELLO  hello naming another device            -> REFUSED
    AWAITING_HELLO  timer past the deadline                -> REFUSED
    OPEN            ping, stats, error, other              -> OPEN
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from margo_stream.protocol import messages as m


class ServerControlState(enum.Enum):
    AWAITING_HELLO = "awaiting-hello"
    OPEN = "open"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class HelloReceived:
    hello: m.Hello


@dataclass(frozen=True, slots=True)
class IdentityMismatch:
    reason: str


@dataclass(frozen=True, slots=True)
class HelloTimedOut:
    reason: str


@dataclass(frozen=True, slots=True)
class SendPong:
    pong: m.Pong


@dataclass(frozen=True, slots=True)
class StatsReported:
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PeerError:
    code: int
    reason: str


ServerControlEvent = HelloReceived | IdentityMismatch | SendPong | StatsReported | PeerError


class ControllerControl:
    def __init__(self, device_id: str, *, now: float, hello_timeout: float) -> None:
        """``device_id``: the one the verified certificate names."""
        self.device_id = device_id
        self.hello_timeout = hello_timeout
        self.state = ServerControlState.AWAITING_HELLO
        self.hello: m.Hello | None = None
        self._deadline = now + hello_timeout

    @property
    def deadline(self) -> float | None:
        """When ``timer`` must run next; ``None`` once the hello was settled."""
        return self._deadline if self.state is ServerControlState.AWAITING_HELLO else None

    def timer(self, now: float) -> HelloTimedOut | None:
        if self.state is not ServerControlState.AWAITING_HELLO or now < self._deadline:
            return None
        self.state = ServerControlState.REFUSED
        return HelloTimedOut(f"no hello on a control stream within {self.hello_timeout:g} s")

    def received(self, message: object) -> ServerControlEvent | None:
        if self.state is ServerControlState.REFUSED:
            return None
        if isinstance(message, m.Hello):
            if self.state is not ServerControlState.AWAITING_HELLO:
                return None  # the stream table refuses a second hello before we see it
            if message.device_id != self.device_id:
                self.state = ServerControlState.REFUSED
                return IdentityMismatch(
                    f"hello names device {message.device_id!r} but the certificate is for "
                    f"{self.device_id!r}"
                )
            self.state = ServerControlState.OPEN
            self.hello = message
            return HelloReceived(message)
        if self.state is not ServerControlState.OPEN:
            return None
        if isinstance(message, m.Ping):
            return SendPong(m.Pong(n=message.n))
        if isinstance(message, m.Stats):
            return StatsReported(dict(message.values))
        if isinstance(message, m.Error):
            return PeerError(message.code, message.reason)
        return None
