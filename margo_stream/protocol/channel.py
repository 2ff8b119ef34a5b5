"""The connection-level sans-IO core: bytes per stream in, protocol events out.

``ChannelCore`` knows nothing of QUIC packets, sockets or time. The transport feeds it the
stream data it received (``receive``) and asks it to encode what the session wants to send
(``encode``, ``end``). It keeps one frame decoder and one ``StreamMachine`` per live stream and
turns problems into ``StreamFailed`` events carrying the error code the transport must reset
that stream with; one bad stream never takes the others down. Which stream failures are fatal
to the whole connection (a broken control stream) is the session's decision, not the core's.

Theory of operation: what a peer can make us hold
-------------------------------------------------
A peer chooses how many streams it opens, what it writes on them and when it stops, so every
piece of state the core keeps for it is bounded, and exceeding a bound is a connection-level
``ConnectionFailed`` event the transport answers with a CONNECTION_CLOSE carrying its code:

- *Unparsed bytes.* Each decoder holds at most one unfinished frame (the length prefix is
  checked before a byte of the body is kept), and the core keeps the sum over all streams.
  Above ``buffer_budget`` the connection fails with ``BUFFER_LIMIT``. The default budget is
  four maximum frames (4 MiB at the default 1 MiB frame): an honest peer has at most one big
  frame in flight per bulk stream (a desired-state blob, a telemetry batch of at most 128 KiB)
  plus small control and terminal frames, so four is generous; a peer that parks unfinished
  frames on many streams (150 x 1 MiB) is cut off after the fourth.
- *Failed streams.* A stream that failed (the peer broke the protocol, or we reset it) keeps
  no decoder, no machine and no exception: only its id, in a set, while the peer may still
  deliver data on it (until its RESET_STREAM or FIN), so that late bytes are ignored instead
  of being parsed as a new stream. More than ``max_failed_streams`` such ids at once (default
  64: an honest peer answers our STOP_SENDING within a round trip, and never breaks dozens of
  streams at once) fails the connection with ``STREAM_LIMIT``; so do more than
  ``max_failed_total`` streams broken by the peer over the connection's life (default 1,000:
  failures of an honest agent are bugs or version skew, a handful per connection; a thousand is
  a peer probing or grinding us, and it must pay a new handshake to go on).
- *Forgotten streams.* ``forget`` while the peer's direction is still open (we gave up on a
  push or a terminal) keeps the id only, so the peer's late bytes are ignored rather than
  read as a new stream (and counted against it); only our side forgets, so these are bounded
  by the streams we open.
- *Live streams.* QUIC's own stream limit (aioquic grants the peer 128 concurrent streams of
  each type, raised only as streams finish) bounds them; the core drops a live stream's state
  as soon as both directions have ended (``StreamEnded`` in and ``end`` out, or ``forget``).

Errors raised while parsing are turned into events at once (code and text): no exception
object, traceback or frame survives a ``receive`` call. After a ``ConnectionFailed`` (or
``close``) the core holds nothing and ignores every later input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from margo_stream.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from margo_stream.protocol.codes import DEFAULT_MAX_FRAME, ErrorCode, Sender, StreamKind
from margo_stream.protocol.frames import FrameDecoder, SharedWindow, encode_frame
from margo_stream.protocol.messages import parse_message, to_wire
from margo_stream.protocol.streams import END, OPENERS, StreamMachine, kind_of_opener

DEFAULT_MAX_FAILED_STREAMS = 64  # failed streams the peer has not closed yet, at once
DEFAULT_MAX_FAILED_TOTAL = 1000  # streams the peer broke over one connection's life
BUFFER_BUDGET_FRAMES = 4  # the default budget of unparsed bytes, in maximum frames


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


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The peer exceeded a per-connection bound: the transport closes the whole connection
    with ``code`` (``STREAM_LIMIT`` or ``BUFFER_LIMIT``). The core holds nothing afterwards."""

    code: ErrorCode
    reason: str


Event = MessageReceived | StreamEnded | StreamFailed | ConnectionFailed


def is_peer_fault(code: int) -> bool:
    """True for the protocol-error codes (0x1xx): a reset with one blames the peer."""
    return 0x100 <= code < 0x200


class _Stream:
    """A live stream. ``decoder`` is None once the peer ended its direction cleanly."""

    __slots__ = ("decoder", "kind", "machine", "broken", "held", "local_ended", "window")

    def __init__(self, max_frame: int, inflate: bool) -> None:
        self.decoder: FrameDecoder | None = FrameDecoder(max_frame, inflate=inflate)
        self.kind: StreamKind | None = None
        self.machine: StreamMachine | None = None
        # a violation of ours (a send the table refused) is sticky as its class, code and text:
        # the machine, which would keep the exception and its traceback, is dropped
        self.broken: tuple[type[ProtocolError], ErrorCode, str] | None = None
        self.held = 0  # unparsed bytes in the decoder, as last counted in the core's total
        self.local_ended = False
        self.window: SharedWindow | None = None  # what our compressed frames refer back to

    def open(self, kind: StreamKind, role: Sender) -> None:
        self.kind = kind
        self.machine = StreamMachine(kind, role)

    def step(self, sender: Sender, message_type: str) -> StreamKind:
        """Advance the machine by one message (or ``END``) from ``sender``."""
        if self.broken is not None:
            cls, code, text = self.broken
            raise cls(text, code)
        assert self.machine is not None and self.kind is not None
        try:
            self.machine.process(sender, message_type)
        except ProtocolError as exc:
            self.broken = (type(exc), exc.code, str(exc))
            self.machine = None
            raise
        return self.kind


class ChannelCore:
    def __init__(
        self,
        role: Sender,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        buffer_budget: int | None = None,
        max_failed_streams: int = DEFAULT_MAX_FAILED_STREAMS,
        max_failed_total: int = DEFAULT_MAX_FAILED_TOTAL,
        inflate: bool = False,
    ) -> None:
        self.role = role
        self.peer = role.peer
        self.max_frame = max_frame
        self.inflate = inflate  # the peer's compressed frames are taken (frames.py)
        self.compress = False  # what we send is compressed (the peer said it takes it)
        self.share_window = False  # ... referring back to its stream (the peer keeps windows)
        self.buffer_budget = (
            BUFFER_BUDGET_FRAMES * max_frame if buffer_budget is None else buffer_budget
        )
        self.max_failed_streams = max_failed_streams
        self.max_failed_total = max_failed_total
        self._streams: dict[int, _Stream] = {}
        self._failed: set[int] = set()  # failed ids the peer may still send on
        # ids we forgot while the peer's direction was open: its late bytes are ignored, not
        # taken for a new stream (bounded by the streams we open: only our side forgets)
        self._ignored: set[int] = set()
        self._faults = 0  # streams the peer broke so far
        self._buffered = 0  # unparsed bytes across all decoders
        self._closed: ConnectionFailed | None = None

    # --- inbound ---------------------------------------------------------------------------------
    def receive(self, stream_id: int, data: bytes, end_stream: bool = False) -> list[Event]:
        if self._closed is not None:
            return []
        if stream_id in self._failed or stream_id in self._ignored:
            if end_stream:  # nothing more can arrive on it
                self._failed.discard(stream_id)
                self._ignored.discard(stream_id)
            return []
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _Stream(self.max_frame, self.inflate)
        decoder = stream.decoder
        if decoder is None:
            return []  # the peer ended this direction; a transport never delivers more
        events: list[Event] = []
        try:
            if data:
                for raw in decoder.feed(data):
                    if stream.kind is None:
                        stream.open(kind_of_opener(raw["t"], self.peer), self.role)
                    kind = stream.step(self.peer, raw["t"])
                    events.append(MessageReceived(stream_id, kind, parse_message(raw)))
            if end_stream:
                decoder.finish()
                if stream.kind is not None:
                    stream.step(self.peer, END)
        except ProtocolError as exc:
            code, reason = exc.code, str(exc)
            fault = isinstance(exc, RemoteProtocolError)
            events.append(StreamFailed(stream_id, self.kind(stream_id), code, reason))
            limit = self._stream_failed(stream_id, peer_done=end_stream, fault=fault)
            if limit is not None:
                events.append(limit)
            return events
        held = decoder.buffered
        self._buffered += held - stream.held
        stream.held = held
        if end_stream:
            events.append(StreamEnded(stream_id, self.kind(stream_id)))
            stream.decoder = None
            if stream.local_ended:
                del self._streams[stream_id]
        elif self._buffered > self.buffer_budget:
            events.append(
                self._fail_connection(
                    ErrorCode.BUFFER_LIMIT,
                    f"{self._buffered} bytes of unfinished frames held across "
                    f"{len(self._streams)} streams, over the {self.buffer_budget}-byte budget",
                )
            )
        return events

    def reset_received(self, stream_id: int, code: int) -> list[Event]:
        if self._closed is not None:
            return []
        if stream_id in self._failed or stream_id in self._ignored:
            self._failed.discard(stream_id)  # the peer's answer to our reset: nothing follows
            self._ignored.discard(stream_id)
            return []
        stream = self._drop(stream_id)
        kind = stream.kind if stream else None
        return [StreamFailed(stream_id, kind, code, ErrorCode.describe(code), reset_by_peer=True)]

    # --- outbound --------------------------------------------------------------------------------
    def encode(self, stream_id: int, message: BaseModel | dict[str, Any]) -> bytes:
        """Check that we may send ``message`` on ``stream_id`` now and return its frame."""
        if self._closed is not None:
            raise LocalProtocolError(
                f"the connection failed ({self._closed.reason}); nothing more can be sent",
                self._closed.code,
            )
        if stream_id in self._failed or stream_id in self._ignored:
            raise LocalProtocolError(
                f"stream {stream_id} has failed or was forgotten; nothing more can be sent on it",
                ErrorCode.PROTOCOL_ERROR,
            )
        raw = to_wire(message) if isinstance(message, BaseModel) else message
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _Stream(self.max_frame, self.inflate)
        if stream.local_ended:
            raise LocalProtocolError(
                f"stream {stream_id}: we ended our direction; nothing more can be sent on it",
                ErrorCode.PROTOCOL_ERROR,
            )
        if stream.kind is None:
            entry = OPENERS.get(raw["t"])
            if entry is None or entry[1] is not self.role:
                raise LocalProtocolError(
                    f"the {self.role} cannot open a stream with a {raw['t']!r} message",
                    ErrorCode.WRONG_STREAM_OPENER,
                )
            stream.open(entry[0], self.role)
        stream.step(self.role, raw["t"])
        window = None  # (set at the hello, before anything is sent: both ends' windows match)
        if self.compress and self.share_window:
            window = stream.window
            if window is None:
                window = stream.window = SharedWindow()
        return encode_frame(raw, max_frame=self.max_frame, compress=self.compress, window=window)

    def end(self, stream_id: int) -> None:
        """We are about to end our direction of ``stream_id`` (check it is allowed)."""
        if self._closed is not None or stream_id in self._failed or stream_id in self._ignored:
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _Stream(self.max_frame, self.inflate)
        if stream.kind is not None and not stream.local_ended:
            stream.step(self.role, END)
        stream.local_ended = True
        if stream.decoder is None:
            del self._streams[stream_id]  # both directions are over

    def fail(self, stream_id: int, code: int = ErrorCode.CANCELLED) -> list[Event]:
        """We reset ``stream_id`` with ``code``: ignore whatever else arrives on it. A
        protocol-error code counts against the peer like a failure we detected; the result is
        ``[ConnectionFailed]`` when that exceeds a bound, else empty."""
        if self._closed is not None or stream_id in self._failed:
            return []
        self._ignored.discard(stream_id)
        stream = self._streams.get(stream_id)
        peer_done = stream is not None and stream.decoder is None
        limit = self._stream_failed(stream_id, peer_done=peer_done, fault=is_peer_fault(code))
        return [] if limit is None else [limit]

    def close(self) -> None:
        """The connection is over: drop every stream's state; later input is ignored."""
        if self._closed is None:
            self._fail_connection(ErrorCode.NO_ERROR, "closed")

    # --- bookkeeping -----------------------------------------------------------------------------
    def kind(self, stream_id: int) -> StreamKind | None:
        stream = self._streams.get(stream_id)
        return stream.kind if stream else None

    def state(self, stream_id: int) -> str | None:
        stream = self._streams.get(stream_id)
        return stream.machine.state if stream and stream.machine else None

    def forget(self, stream_id: int) -> None:
        """We are done with ``stream_id``: drop its state. Bytes the peer still sends on it
        (its direction was not over) are ignored until its end or reset."""
        stream = self._streams.get(stream_id)
        if stream is not None and stream.decoder is not None:
            self._ignored.add(stream_id)
        self._drop(stream_id)

    @property
    def buffered(self) -> int:
        """Unparsed bytes held across all streams (at most ``buffer_budget``)."""
        return self._buffered

    @property
    def failed_streams(self) -> int:
        """Failed streams the peer may still send on (at most ``max_failed_streams``)."""
        return len(self._failed)

    @property
    def failed_total(self) -> int:
        """Streams the peer broke over the connection's life."""
        return self._faults

    @property
    def closed(self) -> ConnectionFailed | None:
        return self._closed

    def __contains__(self, stream_id: int) -> bool:
        return stream_id in self._streams or stream_id in self._failed or stream_id in self._ignored

    def __len__(self) -> int:
        return len(self._streams) + len(self._failed) + len(self._ignored)

    # --- internals -------------------------------------------------------------------------------
    def _drop(self, stream_id: int) -> _Stream | None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._buffered -= stream.held
            stream.held = 0
            stream.decoder = None
        return stream

    def _stream_failed(
        self, stream_id: int, *, peer_done: bool, fault: bool
    ) -> ConnectionFailed | None:
        """Drop everything of a failed stream but (while the peer may still send) its id."""
        self._drop(stream_id)
        if not peer_done:
            self._failed.add(stream_id)
        if fault:
            self._faults += 1
        if len(self._failed) > self.max_failed_streams:
            return self._fail_connection(
                ErrorCode.STREAM_LIMIT,
                f"{len(self._failed)} failed streams not closed by the peer, over the limit "
                f"of {self.max_failed_streams}",
            )
        if self._faults > self.max_failed_total:
            return self._fail_connection(
                ErrorCode.STREAM_LIMIT,
                f"{self._faults} streams failed on this connection, over the limit of "
                f"{self.max_failed_total}",
            )
        return None

    def _fail_connection(self, code: ErrorCode, reason: str) -> ConnectionFailed:
        self._closed = event = ConnectionFailed(code, reason)
        self._streams.clear()
        self._failed.clear()
        self._ignored.clear()
        self._buffered = 0
        return event
