"""One QUIC connection as the sessions see it: message streams over aioquic's sans-IO
``QuicConnection``, driven by the event loop.

``Connection`` owns the aioquic state machine, its timer and a ``ChannelCore``; it turns QUIC
events into protocol events and hands them to its ``ConnectionHandler``. Sends are coalesced:
many messages written in one loop turn leave in as few packets as possible (one transmit per
turn). Each ``MessageStream`` delivers inbound messages either to a callback (cheap, for the
controller's many idle sessions) or to a bounded queue a task awaits; a peer that overruns the
queue gets its stream reset rather than growing our memory. The core bounds the rest of
what a peer can make us hold (failed streams, unparsed bytes: ``margo_stream.protocol.channel``);
a peer over a bound gets the whole connection closed with ``STREAM_LIMIT`` or ``BUFFER_LIMIT``.
A stream's state goes when both its directions are over, and everything at the close (the core,
the streams, the waiters and the handler, so no session outlives its connection through us).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection
from pydantic import BaseModel

from margo_stream.errors import MargoError, ProtocolError
from margo_stream.protocol.channel import (
    ChannelCore,
    ConnectionFailed,
    MessageReceived,
    StreamEnded,
    StreamFailed,
)
from margo_stream.protocol.codes import ErrorCode, Sender, StreamKind
from margo_stream.transport.mtls_hook import peer_reset_tokens
from margo_stream.transport.stateless_reset import is_reset

log = logging.getLogger("margo.transport")

DEFAULT_QUEUE = 256


class ConnectionLost(MargoError):
    """The connection closed; ``code`` and ``reason`` say why (ours or the peer's)."""

    def __init__(self, code: int, reason: str, *, by_peer: bool) -> None:
        who = "peer" if by_peer else "we"
        super().__init__(f"connection closed ({who}): {ErrorCode.describe(code)}: {reason}")
        self.code = code
        self.reason = reason
        self.by_peer = by_peer


class StreamClosed(MargoError):
    """The stream was reset or failed; ``code`` says why."""

    def __init__(self, stream_id: int, code: int, reason: str) -> None:
        super().__init__(f"stream {stream_id}: {ErrorCode.describe(code)}: {reason}")
        self.stream_id = stream_id
        self.code = code
        self.reason = reason


class ConnectionHandler(Protocol):
    def stream_opened(self, stream: MessageStream, first: Any) -> None:
        """The peer opened ``stream`` with ``first`` (delivered right after this returns): set
        ``stream.on_message`` or start a task that awaits ``stream.receive()``, or reset it."""

    def stream_failed(self, stream: MessageStream | None, event: StreamFailed) -> None: ...

    def connection_lost(self, exc: ConnectionLost) -> None: ...


class MessageStream:
    __slots__ = (
        "conn",
        "stream_id",
        "kind",
        "on_message",
        "_queue",
        "_limit",
        "_waiter",
        "_ended",
        "_error",
        "_local_ended",
        "__weakref__",
    )

    def __init__(
        self, conn: Connection, stream_id: int, kind: StreamKind | None, limit: int = DEFAULT_QUEUE
    ) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.kind = kind
        self.on_message: Callable[[Any], None] | None = None
        self._queue: deque[Any] = deque()
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._local_ended = False

    # --- sending ---------------------------------------------------------------------------------
    def send(self, message: BaseModel, *, end: bool = False) -> None:
        self.conn.send(self.stream_id, message, end=end)
        if end:
            self._local_ended = True

    def end(self) -> None:
        if not self._local_ended:
            self._local_ended = True
            self.conn.end_stream(self.stream_id)

    def reset(self, code: int) -> None:
        self.conn.reset_stream(self.stream_id, code)
        self._fail(StreamClosed(self.stream_id, code, "reset by us"))

    # --- receiving -------------------------------------------------------------------------------
    async def receive(self) -> Any | None:
        """The next message; ``None`` once the peer ended the stream cleanly."""
        while not self._queue:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            self._waiter = self.conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def _deliver(self, message: Any) -> None:
        if self.on_message is not None:
            self.on_message(message)
            return
        if len(self._queue) >= self._limit:
            self.reset(ErrorCode.PROTOCOL_ERROR)
            log.warning(
                "stream %d overran its %d-message queue; reset", self.stream_id, self._limit
            )
            return
        self._queue.append(message)
        self._wake()

    def _end(self) -> None:
        self._ended = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def ended(self) -> bool:
        return self._ended


class Connection:
    """Drives one ``QuicConnection``. ``sendto`` puts one datagram on the wire."""

    def __init__(
        self,
        quic: QuicConnection,
        role: Sender,
        sendto: Callable[[bytes, Any], None],
        loop: asyncio.AbstractEventLoop,
        *,
        max_frame: int = 1 << 20,
    ) -> None:
        self.quic = quic
        self.role = role
        self.loop = loop
        self.core = ChannelCore(role, max_frame=max_frame)
        self.handler: ConnectionHandler | None = None
        self.streams: dict[int, MessageStream] = {}
        self.last_received = loop.time()
        self.closed: ConnectionLost | None = None
        self._sendto = sendto
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmit_handle: asyncio.Handle | None = None
        self._closed_waiters: list[asyncio.Future[None]] = []
        self._handshake_waiter: asyncio.Future[None] | None = None
        self.handshake_done = False
        # endpoint hooks (server: identity check at handshake; both: drop state at the end)
        self.on_handshake: Callable[[Connection, qe.HandshakeCompleted], None] | None = None
        self.on_terminated: Callable[[Connection], None] | None = None
        self.on_cid_event: Callable[[Connection, qe.QuicEvent], None] | None = None
        self.route_ids: set[bytes] = set()  # connection IDs the endpoint routes to us
        self.remote: Any = None

    # --- network side ---------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = self.loop.time()
        self.last_received = now
        self.remote = addr
        if self.role is Sender.AGENT and is_reset(data, peer_reset_tokens(self.quic)):
            # the controller no longer knows this connection (it restarted): RFC 9000 10.3.1,
            # the connection is over and nothing more is sent on it
            self.cancel_timer()
            self._terminated(
                ErrorCode.NO_ERROR,
                "stateless reset: the controller no longer knows this connection (restarted?)",
                by_peer=True,
            )
            if self.on_terminated is not None:
                self.on_terminated(self)
            return
        self.quic.receive_datagram(data, addr, now=now)
        self._drain_events()
        # Answer at the end of this loop turn, not per datagram: a peer's flight that spans
        # several datagrams gets one reply, and what our side sends in reaction to these
        # events (a hello right after the handshake, a HelloAck) rides in the same packets
        # as the ACKs and the handshake's last flight.
        self.schedule_transmit()

    def process_events(self) -> None:
        self._drain_events()
        self.transmit()

    def _drain_events(self) -> None:
        quic = self.quic
        event = quic.next_event()
        while event is not None:
            try:
                self.quic_event(event)
            except Exception:
                # The barrier (as h11's): a bug in a session or feature handler ends this one
                # connection with INTERNAL_ERROR and a traceback in the log; it never escapes
                # into the endpoint that serves every other device.
                log.exception(
                    "a handler failed on %s; closing this connection",
                    type(event).__name__,
                    extra={"event": "handler-failed", "remote": str(self.remote)},
                )
                self.close(ErrorCode.INTERNAL_ERROR, "internal error")
                return
            event = quic.next_event()

    def transmit(self) -> None:
        if self._transmit_handle is not None:
            self._transmit_handle.cancel()  # this call does its work
            self._transmit_handle = None
        sendto = self._sendto
        for data, addr in self.quic.datagrams_to_send(now=self.loop.time()):
            sendto(data, addr)
        timer_at = self.quic.get_timer()
        if timer_at != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if timer_at is not None:
                self._timer = self.loop.call_at(timer_at, self._on_timer)
            self._timer_at = timer_at

    def schedule_transmit(self) -> None:
        if self._transmit_handle is None:
            self._transmit_handle = self.loop.call_soon(self._scheduled_transmit)

    def _scheduled_transmit(self) -> None:
        self._transmit_handle = None
        self.transmit()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.quic.handle_timer(now=self.loop.time())
        self.process_events()

    # --- QUIC events ------------------------------------------------------------------------------
    def quic_event(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.ConnectionTerminated):
            self._terminated(event.error_code, event.reason_phrase, by_peer=True)
            if self.on_terminated is not None:
                self.on_terminated(self)
            return
        if self.closed is not None:
            return
        if isinstance(event, qe.StreamDataReceived):
            self._protocol_events(self.core.receive(event.stream_id, event.data, event.end_stream))
        elif isinstance(event, qe.ConnectionIdIssued | qe.ConnectionIdRetired):
            if self.on_cid_event is not None:
                self.on_cid_event(self, event)
        elif isinstance(event, qe.StreamReset):
            self._protocol_events(self.core.reset_received(event.stream_id, event.error_code))
        elif isinstance(event, qe.HandshakeCompleted):
            self.handshake_done = True
            if self.on_handshake is not None:
                self.on_handshake(self, event)
            if self._handshake_waiter is not None and not self._handshake_waiter.done():
                self._handshake_waiter.set_result(None)

    def _protocol_events(self, events: list[Any]) -> None:
        for ev in events:
            if self.closed is not None:
                return  # a handler (or a bound) closed the connection: the rest is moot
            if isinstance(ev, MessageReceived):
                stream = self.streams.get(ev.stream_id)
                if stream is None:
                    # The peer opened it: the handler decides how to consume it (callback or
                    # queue) and then gets the first message like every later one.
                    stream = self.streams[ev.stream_id] = MessageStream(self, ev.stream_id, ev.kind)
                    if self.handler is None:
                        self.reset_stream(ev.stream_id, ErrorCode.PROTOCOL_ERROR)
                        continue
                    self.handler.stream_opened(stream, ev.message)
                    if self.streams.get(ev.stream_id) is not stream:
                        continue  # the handler refused (reset) it
                stream._deliver(ev.message)
            elif isinstance(ev, StreamEnded):
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream._end()
                    self._release_if_done(ev.stream_id)
                else:
                    # the peer opened a stream and ended it without a message: end ours too,
                    # so that neither QUIC nor the core keeps it
                    self.core.forget(ev.stream_id)
                    self._finish_quic_stream(ev.stream_id)
            elif isinstance(ev, StreamFailed):
                stream = self.streams.pop(ev.stream_id, None)
                if not ev.reset_by_peer:
                    self._reset_quic_stream(ev.stream_id, ev.code)
                    log.debug("stream %d (%s) failed: %s", ev.stream_id, ev.kind, ev.reason)
                if stream is not None:
                    stream._fail(StreamClosed(ev.stream_id, ev.code, ev.reason))
                if self.handler is not None:
                    self.handler.stream_failed(stream, ev)
            elif isinstance(ev, ConnectionFailed):
                self._connection_failed(ev)

    def _connection_failed(self, ev: ConnectionFailed) -> None:
        """The peer exceeded a per-connection bound: close the connection with its code."""
        log.warning(
            "closing the connection from %s: %s",
            self.remote,
            ev.reason,
            extra={"event": "connection-bounds", "remote": str(self.remote), "code": int(ev.code)},
        )
        self.close(ev.code, ev.reason)

    def _release_if_done(self, stream_id: int) -> None:
        """Both directions of ``stream_id`` are over (the core let go of it): drop ours."""
        if stream_id not in self.core:
            self.streams.pop(stream_id, None)

    # --- sending -----------------------------------------------------------------------------------
    def open_stream(self, *, limit: int = DEFAULT_QUEUE) -> MessageStream:
        stream_id = self.quic.get_next_available_stream_id(is_unidirectional=False)
        # Claim the id in aioquic now (an empty write creates the stream), so two streams opened
        # before either has sent anything never share an id.
        self.quic.send_stream_data(stream_id, b"", end_stream=False)
        stream = self.streams[stream_id] = MessageStream(self, stream_id, None, limit)
        return stream

    def send(self, stream_id: int, message: BaseModel, *, end: bool = False) -> None:
        if self.closed is not None:
            raise self.closed
        frame = self.core.encode(stream_id, message)
        stream = self.streams.get(stream_id)
        if stream is not None and stream.kind is None:
            stream.kind = self.core.kind(stream_id)
        if end:
            self.core.end(stream_id)
            self._release_if_done(stream_id)
        self.quic.send_stream_data(stream_id, frame, end_stream=end)
        self.schedule_transmit()

    def end_stream(self, stream_id: int) -> None:
        if self.closed is not None:
            return
        self.core.end(stream_id)
        self._release_if_done(stream_id)
        self.quic.send_stream_data(stream_id, b"", end_stream=True)
        self.schedule_transmit()

    def reset_stream(self, stream_id: int, code: int) -> None:
        failed = self.core.fail(stream_id, code)
        self.streams.pop(stream_id, None)
        if self.closed is None:
            self._reset_quic_stream(stream_id, code)
            self.schedule_transmit()
        for ev in failed:
            if isinstance(ev, ConnectionFailed) and self.closed is None:
                self._connection_failed(ev)

    def _finish_quic_stream(self, stream_id: int) -> None:
        try:
            self.quic.send_stream_data(stream_id, b"", end_stream=True)
        except (ValueError, AssertionError):
            pass  # a stream we cannot send on (unidirectional), or already finished

    def _reset_quic_stream(self, stream_id: int, code: int) -> None:
        try:
            self.quic.reset_stream(stream_id, code)
        except (ValueError, AssertionError):
            pass  # already finished in that direction
        try:
            self.quic.stop_stream(stream_id, code)
        except (ValueError, AssertionError):
            pass

    def forget_stream(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.core.forget(stream_id)

    def ping(self) -> None:
        if self.closed is None:
            self.quic.send_ping(0)
            self.schedule_transmit()

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        if self.closed is not None:
            return
        self.quic.close(error_code=int(code), reason_phrase=reason)
        self.transmit()
        self._terminated(code, reason, by_peer=False)

    # --- lifecycle ---------------------------------------------------------------------------------
    def _terminated(self, code: int, reason: str, *, by_peer: bool) -> None:
        if self.closed is not None:
            return
        exc = self.closed = ConnectionLost(code, reason, by_peer=by_peer)
        self.core.close()  # every stream's buffers and state go now, not with the object
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._fail(exc)
        waiter, self._handshake_waiter = self._handshake_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        handler, self.handler = self.handler, None  # no cycle session <-> connection outlives us
        if handler is not None:
            try:
                handler.connection_lost(exc)
            except Exception:
                log.exception(
                    "the connection-lost handler failed", extra={"event": "handler-failed"}
                )

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None

    async def wait_handshake(self) -> None:
        """Return once the handshake has completed (at once if it already has)."""
        if self.closed is not None:
            raise self.closed
        if self.handshake_done:
            return
        self._handshake_waiter = self.loop.create_future()
        await self._handshake_waiter

    async def wait_closed(self) -> ConnectionLost:
        if self.closed is None:
            waiter = self.loop.create_future()
            self._closed_waiters.append(waiter)
            await waiter
        assert self.closed is not None
        return self.closed


__all__ = [
    "Connection",
    "ConnectionHandler",
    "ConnectionLost",
    "MessageStream",
    "StreamClosed",
    "ProtocolError",
]


def is_link_loss(exc: BaseException) -> bool:
    """True when ``exc`` (or every leaf of an exception group) is the connection or a stream
    going away: the normal end of a task that served a link, not a bug to report."""
    if isinstance(exc, ConnectionLost | StreamClosed):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(is_link_loss(e) for e in exc.exceptions)
    return False
