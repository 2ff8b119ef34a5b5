"""The connection-level sans-IO core: bytes per stream in, protocol events out.

``ChannelCore`` knows nothing of QUIC packets, sockets or time. The transport feeds it the
stream data it received (``receive``) and asks it to encode what the session wants to send
(``encode``, ``end``). It keeps one frame decoder and one ``StreamMachine`` per stream and
turns problems into ``StreamFailed`` events carrying the error code the transport must reset
that stream with; one bad stream never takes the others down. Which failures are fatal to the
whole connection (a broken control stream) is the session's decision, not the core's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from margo_stream.errors import LocalProtocolError, ProtocolError
from margo_stream.protocol.codes import DEFAULT_MAX_FRAME, ErrorCode, Sender, StreamKind
from margo_stream.protocol.frames import FrameDecoder, encode_frame
from margo_stream.protocol.messages import parse_message, to_wire
from margo_stream.protocol.streams import END, OPENERS, StreamMachine, kind_of_opener


@dataclass(frozen=True, slots=True)
class MessageReceived:
    stream_id: int
    kind: StreamKind
    message: Any  # one of the models in margo_stream.protocol.messages


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer ended its direction cleanly (no partial frame left)."""

    stream_id: int
    kind: StreamKind | None


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """The stream is broken; the transport resets it with ``code``. ``local`` tells whether we
    detected a fault of the peer's (False) or the peer reset it (``reset_by_peer``)."""

    stream_id: int
    kind: StreamKind | None
    code: int
    reason: str
    reset_by_peer: bool = False


Event = MessageReceived | StreamEnded | StreamFailed


class _Stream:
    __slots__ = ("decoder", "machine", "failed")

    def __init__(self, max_frame: int) -> None:
        self.decoder = FrameDecoder(max_frame)
        self.machine: StreamMachine | None = None
        self.failed = False


class ChannelCore:
    def __init__(self, role: Sender, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.role = role
        self.peer = role.peer
        self.max_frame = max_frame
        self._streams: dict[int, _Stream] = {}

    # --- inbound ---------------------------------------------------------------------------------
    def receive(self, stream_id: int, data: bytes, end_stream: bool = False) -> list[Event]:
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _Stream(self.max_frame)
        if stream.failed:
            return []
        events: list[Event] = []
        try:
            if data:
                for raw in stream.decoder.feed(data):
                    if stream.machine is None:
                        kind = kind_of_opener(raw["t"], self.peer)
                        stream.machine = StreamMachine(kind, self.role)
                    stream.machine.process(self.peer, raw["t"])
                    events.append(
                        MessageReceived(stream_id, stream.machine.kind, parse_message(raw))
                    )
            if end_stream:
                stream.decoder.finish()
                if stream.machine is not None:
                    stream.machine.process(self.peer, END)
                events.append(StreamEnded(stream_id, self.kind(stream_id)))
        except ProtocolError as exc:
            stream.failed = True
            events.append(StreamFailed(stream_id, self.kind(stream_id), exc.code, str(exc)))
        return events

    def reset_received(self, stream_id: int, code: int) -> list[Event]:
        stream = self._streams.pop(stream_id, None)
        if stream is not None and stream.failed:
            return []
        kind = stream.machine.kind if stream and stream.machine else None
        return [StreamFailed(stream_id, kind, code, ErrorCode.describe(code), reset_by_peer=True)]

    # --- outbound --------------------------------------------------------------------------------
    def encode(self, stream_id: int, message: BaseModel | dict[str, Any]) -> bytes:
        """Check that we may send ``message`` on ``stream_id`` now and return its frame."""
        raw = to_wire(message) if isinstance(message, BaseModel) else message
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _Stream(self.max_frame)
        if stream.failed:
            raise LocalProtocolError(
                f"stream {stream_id} has failed; nothing more can be sent on it",
                ErrorCode.PROTOCOL_ERROR,
            )
        if stream.machine is None:
            entry = OPENERS.get(raw["t"])
            if entry is None or entry[1] is not self.role:
                raise LocalProtocolError(
                    f"the {self.role} cannot open a stream with a {raw['t']!r} message",
                    ErrorCode.WRONG_STREAM_OPENER,
                )
            stream.machine = StreamMachine(entry[0], self.role)
        stream.machine.process(self.role, raw["t"])
        return encode_frame(raw, max_frame=self.max_frame)

    def end(self, stream_id: int) -> None:
        """We are about to end our direction of ``stream_id`` (check it is allowed)."""
        stream = self._streams.get(stream_id)
        if stream is not None and stream.machine is not None and not stream.failed:
            stream.machine.process(self.role, END)

    def fail(self, stream_id: int) -> None:
        """We reset ``stream_id``: ignore whatever else arrives on it."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.failed = True

    # --- bookkeeping -----------------------------------------------------------------------------
    def kind(self, stream_id: int) -> StreamKind | None:
        stream = self._streams.get(stream_id)
        return stream.machine.kind if stream and stream.machine else None

    def state(self, stream_id: int) -> str | None:
        stream = self._streams.get(stream_id)
        return stream.machine.state if stream and stream.machine else None

    def forget(self, stream_id: int) -> None:
        """Both directions are finished: drop the stream's state."""
        self._streams.pop(stream_id, None)

    def __len__(self) -> int:
        return len(self._streams)
