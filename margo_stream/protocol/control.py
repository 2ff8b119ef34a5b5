"""The agent's end of the control stream, sans-IO: the hello's answer, then small messages.

Theory of operation
-------------------
The agent opens the control stream and sends its hello; the first message back decides the
session. :meth:`AgentControl.hello_answer` takes it: a ``hello_ack`` opens the session and
yields :class:`HelloAccepted` (the ack and the keepalive interval to use: the agent's own
setting if it has one, else the controller's); an ``error`` or anything else raises
:class:`HelloRefused`, and the refusal is final.

Once open, :meth:`AgentControl.received` maps each later message to what the driver must do:
a ``ping`` to :class:`SendPong`, an ``error`` to :class:`PeerError` (log it), the end of the
stream (``None``) to :class:`ControlEnded` (close the connection); anything else is ignored.

States (``ControlState``), as a table of (state, input) -> state::

    AWAITING_ANSWER  hello_ack          -> OPEN
    AWAITING_ANSWER  error / other      -> REFUSED   (raises HelloRefused)
    OPEN             end of stream      -> ENDED
    OPEN             ping, error, other -> OPEN
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from margo_stream.errors import LocalProtocolError, MargoError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode


class HelloRefused(MargoError):
    """The controller answered the hello with an error (or with something else)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"controller refused the hello: {ErrorCode.describe(code)}: {reason}")
        self.code = code
        self.reason = reason


class ControlState(enum.Enum):
    AWAITING_ANSWER = "awaiting-answer"
    OPEN = "open"
    REFUSED = "refused"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class HelloAccepted:
    ack: m.HelloAck
    keepalive_s: float


@dataclass(frozen=True, slots=True)
class SendPong:
    pong: m.Pong


@dataclass(frozen=True, slots=True)
class PeerError:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ControlEnded:
    """The controller ended the control stream: the session is over."""


ControlEvent = SendPong | PeerError | ControlEnded


class AgentControl:
    def __init__(self, keepalive_s: float | None = None) -> None:
        """``keepalive_s``: the agent's own interval; ``None`` takes the controller's."""
        self.keepalive_s = keepalive_s
        self.state = ControlState.AWAITING_ANSWER
        self.ack: m.HelloAck | None = None

    def hello_answer(self, message: object) -> HelloAccepted:
        if self.state is not ControlState.AWAITING_ANSWER:
            raise LocalProtocolError(
                f"the hello was already answered ({self.state.value})", ErrorCode.INTERNAL_ERROR
            )
        if not isinstance(message, m.HelloAck):
            self.state = ControlState.REFUSED
            if isinstance(message, m.Error):
                raise HelloRefused(message.code, message.reason)
            what = "end of stream" if message is None else type(message).__name__
            raise HelloRefused(ErrorCode.UNEXPECTED_MESSAGE, f"unexpected {what}")
        self.state = ControlState.OPEN
        self.ack = message
        return HelloAccepted(message, self.keepalive_s or message.keepalive_s)

    def received(self, message: object | None) -> ControlEvent | None:
        if self.state is not ControlState.OPEN:
            raise LocalProtocolError(
                f"control message while {self.state.value}", ErrorCode.INTERNAL_ERROR
            )
        if message is None:
            self.state = ControlState.ENDED
            return ControlEnded()
        if isinstance(message, m.Ping):
            return SendPong(m.Pong(n=message.n))
        if isinstance(message, m.Error):
            return PeerError(message.code, message.reason)
        return None
