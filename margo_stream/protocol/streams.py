"""Per-stream state machines, written as tables.

Theory of operation
-------------------
Every QUIC stream carries exactly one job (its ``StreamKind``), fixed by the type of the
first message on it and checked against who may open that kind (``OPENERS``). From then on a
``StreamMachine`` tracks one state per stream; each message either side sends or receives is
looked up in ``TRANSITIONS[(kind, state, sender, message type)]``. A miss is a protocol error:
``LocalProtocolError`` when we tried to send it, ``RemoteProtocolError`` when the peer did.
The end of a direction (QUIC FIN) is the pseudo-message ``END`` and goes through the same
table, so "a desired-state push is only complete after the controller ended its side" is one
table row, not a special case. Errors are sticky: a machine that raised stays broken.
"""

from __future__ import annotations

import enum

from margo_stream.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from margo_stream.protocol.codes import ErrorCode, Sender, StreamKind

END = "END"  # pseudo message type: the sender ended its direction of the stream


class State(enum.StrEnum):
    IDLE = "idle"
    AWAIT_HELLO_ACK = "await-hello-ack"
    READY = "ready"
    RECEIVING = "receiving"
    AWAIT_RESULT = "await-result"
    OPEN = "open"
    OPENING = "opening"
    ACTIVE = "active"
    CLOSING = "closing"
    EXITED = "exited"
    DONE = "done"


A, C = Sender.AGENT, Sender.CONTROLLER
K = StreamKind
S = State

# first message type -> (stream kind, who may open it)
OPENERS: dict[str, tuple[StreamKind, Sender]] = {
    "hello": (K.CONTROL, A),
    "status": (K.STATUS, A),
    "telemetry": (K.TELEMETRY, A),
    "desired": (K.DESIRED, C),
    "term_open": (K.TERMINAL, C),
    "logs_open": (K.LOGS, C),
}

TRANSITIONS: dict[tuple[StreamKind, State, Sender, str], State] = {
    # control: hello, hello_ack, then keepalive / stats / errors for the connection's life
    (K.CONTROL, S.IDLE, A, "hello"): S.AWAIT_HELLO_ACK,
    (K.CONTROL, S.AWAIT_HELLO_ACK, C, "hello_ack"): S.READY,
    (K.CONTROL, S.AWAIT_HELLO_ACK, C, "error"): S.DONE,
    (K.CONTROL, S.READY, A, "ping"): S.READY,
    (K.CONTROL, S.READY, C, "ping"): S.READY,
    (K.CONTROL, S.READY, A, "pong"): S.READY,
    (K.CONTROL, S.READY, C, "pong"): S.READY,
    (K.CONTROL, S.READY, A, "stats"): S.READY,
    (K.CONTROL, S.READY, A, "error"): S.DONE,
    (K.CONTROL, S.READY, C, "error"): S.DONE,
    # desired state: manifest, blobs, END from the controller; then the agent's verdict
    (K.DESIRED, S.IDLE, C, "desired"): S.RECEIVING,
    (K.DESIRED, S.RECEIVING, C, "blob"): S.RECEIVING,
    (K.DESIRED, S.RECEIVING, C, END): S.AWAIT_RESULT,
    (K.DESIRED, S.AWAIT_RESULT, A, "desired_result"): S.DONE,
    (K.DESIRED, S.AWAIT_RESULT, A, "error"): S.DONE,
    (K.DESIRED, S.DONE, A, END): S.DONE,
    # status events and telemetry batches: agent sends, controller acks, for the stream's life
    (K.STATUS, S.IDLE, A, "status"): S.OPEN,
    (K.STATUS, S.OPEN, A, "status"): S.OPEN,
    (K.STATUS, S.OPEN, C, "status_ack"): S.OPEN,
    (K.TELEMETRY, S.IDLE, A, "telemetry"): S.OPEN,
    (K.TELEMETRY, S.OPEN, A, "telemetry"): S.OPEN,
    (K.TELEMETRY, S.OPEN, C, "telemetry_ack"): S.OPEN,
    # terminal: open, opened (or error), bytes both ways, exit from the device or close from
    # the operator; late bytes after either end are tolerated, never an error
    (K.TERMINAL, S.IDLE, C, "term_open"): S.OPENING,
    (K.TERMINAL, S.OPENING, A, "term_opened"): S.ACTIVE,
    (K.TERMINAL, S.OPENING, A, "error"): S.DONE,
    (K.TERMINAL, S.OPENING, C, "term_close"): S.CLOSING,
    (K.TERMINAL, S.ACTIVE, C, "term_data"): S.ACTIVE,
    (K.TERMINAL, S.ACTIVE, C, "term_resize"): S.ACTIVE,
    (K.TERMINAL, S.ACTIVE, C, "term_eof"): S.ACTIVE,
    (K.TERMINAL, S.ACTIVE, A, "term_data"): S.ACTIVE,
    (K.TERMINAL, S.ACTIVE, A, "term_exit"): S.EXITED,
    (K.TERMINAL, S.ACTIVE, C, "term_close"): S.CLOSING,
    (K.TERMINAL, S.CLOSING, A, "term_opened"): S.CLOSING,
    (K.TERMINAL, S.CLOSING, A, "term_data"): S.CLOSING,
    (K.TERMINAL, S.CLOSING, A, "term_exit"): S.DONE,
    (K.TERMINAL, S.CLOSING, A, "error"): S.DONE,
    (K.TERMINAL, S.EXITED, C, "term_data"): S.EXITED,
    (K.TERMINAL, S.EXITED, C, "term_resize"): S.EXITED,
    (K.TERMINAL, S.EXITED, C, "term_eof"): S.EXITED,
    (K.TERMINAL, S.EXITED, C, "term_close"): S.DONE,
    # flow control: byte acks either way while bytes may still be flowing toward the acker
    (K.TERMINAL, S.ACTIVE, C, "term_ack"): S.ACTIVE,
    (K.TERMINAL, S.ACTIVE, A, "term_ack"): S.ACTIVE,
    (K.TERMINAL, S.EXITED, C, "term_ack"): S.EXITED,
    (K.TERMINAL, S.CLOSING, A, "term_ack"): S.CLOSING,
    # workload logs: the controller asks for a component's log, the agent names the
    # components it will send (or an error), then lines (acked by the controller, a window of
    # bytes in flight) and logs_end; the controller ends its side to stop a follow
    (K.LOGS, S.IDLE, C, "logs_open"): S.OPENING,
    (K.LOGS, S.OPENING, A, "logs_opened"): S.OPEN,
    (K.LOGS, S.OPENING, A, "error"): S.DONE,
    (K.LOGS, S.OPEN, A, "logs_lines"): S.OPEN,
    (K.LOGS, S.OPEN, C, "logs_ack"): S.OPEN,
    (K.LOGS, S.OPEN, A, "logs_end"): S.DONE,
    (K.LOGS, S.DONE, C, "logs_ack"): S.DONE,
}

# Ending one's direction is always allowed on these kinds, in any state (half-close).
_FREE_END = {K.STATUS, K.TELEMETRY, K.TERMINAL, K.CONTROL, K.LOGS}


class StreamMachine:
    """The state of one stream; ``role`` is who we are (to tell local from remote errors)."""

    __slots__ = ("kind", "role", "state", "_error")

    def __init__(self, kind: StreamKind, role: Sender) -> None:
        self.kind = kind
        self.role = role
        self.state = State.IDLE
        self._error: ProtocolError | None = None

    def process(self, sender: Sender, message_type: str) -> State:
        if self._error is not None:
            raise self._error
        new = TRANSITIONS.get((self.kind, self.state, sender, message_type))
        if new is None:
            if message_type == END and self.kind in _FREE_END:
                return self.state
            what = "end of stream" if message_type == END else f"{message_type!r} message"
            cls = LocalProtocolError if sender is self.role else RemoteProtocolError
            self._error = cls(
                f"{what} from the {sender} is not allowed on a {self.kind} stream "
                f"in state {self.state}",
                ErrorCode.UNEXPECTED_MESSAGE,
            )
            raise self._error
        self.state = new
        return new


def kind_of_opener(message_type: str, sender: Sender) -> StreamKind:
    """The kind of a stream whose first message is ``message_type`` sent by ``sender``."""
    entry = OPENERS.get(message_type)
    if entry is None:
        raise RemoteProtocolError(
            f"a stream cannot start with a {message_type!r} message",
            ErrorCode.UNKNOWN_STREAM_KIND,
        )
    kind, opener = entry
    if opener is not sender:
        raise RemoteProtocolError(
            f"the {sender} may not open a {kind} stream (only the {opener} does)",
            ErrorCode.WRONG_STREAM_OPENER,
        )
    return kind
