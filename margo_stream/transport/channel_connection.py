"""One channel connection as the sessions see it, whatever carries it: message streams over a
``ChannelCore``, driven by the event loop.

``ChannelConnection`` owns the core, the ``MessageStream`` objects, the handler dispatch, the
send path and the lifecycle (waiters, the close); a carrier subclass moves the bytes:
``Connection`` (QUIC, ``margo_stream.transport.connection``) or ``TcpConnection`` (HTTP/2 over
TLS on TCP, ``margo_stream.transport.h2_carrier``). ``carrier`` says which. The carrier feeds
what it received into ``self.core`` and hands the resulting events to ``_protocol_events``; the
base calls the carrier back through a handful of hooks (``_carrier_*``) to put frames on a
stream, end or reset a stream, open one, ping, and close.

Each ``MessageStream`` delivers inbound messages either to a callback (cheap, for the
controller's many idle sessions) or to a bounded queue a task awaits; a peer that overruns the
queue gets its stream reset rather than growing our memory. The core bounds the rest of what a
peer can make us hold (failed streams, unparsed bytes: ``margo_stream.protocol.channel``); a peer
over a bound gets the whole connection closed with ``STREAM_LIMIT`` or ``BUFFER_LIMIT``. A
stream's state goes when both its directions are over, and everything at the close (the core,
the streams, the waiters and the handler, so no session outlives its connection through us).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from margo_stream.errors import MargoError
from margo_stream.protocol.channel import (
    ChannelCore,
    ConnectionFailed,
    MessageReceived,
    StreamEnded,
    StreamFailed,
)
from margo_stream.protocol.codes import ErrorCode, Sender, StreamKind

log = logging.getLogger("margo.transport")

DEFAULT_QUEUE = 256

Carrier = Literal["quic", "tcp"]


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
        self,
        conn: ChannelConnection,
        stream_id: int,
        kind: StreamKind | None,
        limit: int = DEFAULT_QUEUE,
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


class ChannelConnection:
    """The channel over one carrier connection (see the module note). Subclasses implement the
    ``_carrier_*`` hooks, ``schedule_transmit`` and ``peer_certificate_der``."""

    carrier: Carrier

    def __init__(
        self, role: Sender, loop: asyncio.AbstractEventLoop, *, max_frame: int = 1 << 20
    ) -> None:
        self.role = role
        self.loop = loop
        # the agent takes compressed frames (the controller sends them once the hello says so)
        self.core = ChannelCore(role, max_frame=max_frame, inflate=role is Sender.AGENT)
        self.handler: ConnectionHandler | None = None
        self.streams: dict[int, MessageStream] = {}
        self.last_received = loop.time()
        self.closed: ConnectionLost | None = None
        self.handshake_done = False
        self.remote: Any = None
        self._closed_waiters: list[asyncio.Future[None]] = []
        self._handshake_waiter: asyncio.Future[None] | None = None

    # --- carrier hooks ---------------------------------------------------------------------------
    def _carrier_open(self) -> int:
        """Claim the id of a new stream we open (no two streams opened before either sent
        anything may share one)."""
        raise NotImplementedError

    def _carrier_send(self, stream_id: int, data: bytes, end: bool) -> None:
        """Queue ``data`` (possibly empty) on ``stream_id``; ``end`` ends our direction."""
        raise NotImplementedError

    def _carrier_finish(self, stream_id: int) -> None:
        """End our direction of a stream the peer opened and ended without a message; a stream
        that cannot take it (already over) is left alone."""
        raise NotImplementedError

    def _carrier_reset(self, stream_id: int, code: int) -> None:
        """Abort both directions of ``stream_id`` with ``code`` (a stream already over: no-op)."""
        raise NotImplementedError

    def _carrier_ping(self) -> None:
        raise NotImplementedError

    def _carrier_close(self, code: int, reason: str) -> None:
        """Tell the peer we close with ``code`` and ``reason`` and let the carrier go; the
        channel state is released by ``_terminated`` right after."""
        raise NotImplementedError

    def schedule_transmit(self) -> None:
        """Send what is queued at the end of this loop turn (one flush per turn)."""
        raise NotImplementedError

    def transmit(self) -> None:
        """Send what is queued now (a turn's flush finds nothing left of this connection)."""
        raise NotImplementedError

    def peer_certificate_der(self) -> bytes | None:
        """The peer's leaf certificate (DER), once the handshake completed."""
        raise NotImplementedError

    # --- inbound ---------------------------------------------------------------------------------
    def _guarded(self, what: str, fn: Callable[[], None]) -> bool:
        """The barrier (as h11's): a bug in a session or feature handler ends this one
        connection with INTERNAL_ERROR and a traceback in the log; it never escapes into the
        endpoint that serves every other device. False when ``fn`` failed."""
        try:
            fn()
        except Exception:
            log.exception(
                "a handler failed on %s; closing this connection",
                what,
                extra={"event": "handler-failed", "remote": str(self.remote)},
            )
            self.close(ErrorCode.INTERNAL_ERROR, "internal error")
            return False
        return True

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
                    # so that neither the carrier nor the core keeps it
                    self.core.forget(ev.stream_id)
                    self._carrier_finish(ev.stream_id)
            elif isinstance(ev, StreamFailed):
                stream = self.streams.pop(ev.stream_id, None)
                if not ev.reset_by_peer:
                    self._carrier_reset(ev.stream_id, ev.code)
                    log.debug("stream %d (%s) failed: %s", ev.stream_id, ev.kind, ev.reason)
                if stream is not None:
                    stream._fail(StreamClosed(ev.stream_id, ev.code, ev.reason))
                if self.handler is not None:
                    self.handler.stream_failed(stream, ev)
            elif isinstance(ev, ConnectionFailed):
                self._connection_failed(ev)

    def _stream_broken(self, stream_id: int, code: int, reason: str) -> None:
        """The carrier found ``stream_id`` unusable (the peer answered it wrongly): fail it
        like a stream the core found broken (reset, the stream's reader and the handler
        told)."""
        kind = self.core.kind(stream_id)
        stream = self.streams.get(stream_id)
        if kind is None and stream is not None:
            kind = stream.kind
        after = self.core.fail(stream_id, code)
        self._protocol_events([StreamFailed(stream_id, kind, code, reason), *after])

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
        if self.closed is not None:
            raise self.closed
        stream_id = self._carrier_open()
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
        self._carrier_send(stream_id, frame, end)
        self.schedule_transmit()

    def end_stream(self, stream_id: int) -> None:
        if self.closed is not None:
            return
        self.core.end(stream_id)
        self._release_if_done(stream_id)
        self._carrier_send(stream_id, b"", True)
        self.schedule_transmit()

    def reset_stream(self, stream_id: int, code: int) -> None:
        failed = self.core.fail(stream_id, code)
        self.streams.pop(stream_id, None)
        if self.closed is None:
            self._carrier_reset(stream_id, code)
            self.schedule_transmit()
        for ev in failed:
            if isinstance(ev, ConnectionFailed) and self.closed is None:
                self._connection_failed(ev)

    def forget_stream(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.core.forget(stream_id)

    def ping(self) -> None:
        if self.closed is None:
            self._carrier_ping()
            self.schedule_transmit()

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        if self.closed is not None:
            return
        self._carrier_close(code, reason)
        self._terminated(code, reason, by_peer=False)

    # --- lifecycle ---------------------------------------------------------------------------------
    def _handshake_completed(self) -> None:
        self.handshake_done = True
        if self._handshake_waiter is not None and not self._handshake_waiter.done():
            self._handshake_waiter.set_result(None)

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


def is_link_loss(exc: BaseException) -> bool:
    """True when ``exc`` (or every leaf of an exception group) is the connection or a stream
    going away: the normal end of a task that served a link, not a bug to report."""
    if isinstance(exc, ConnectionLost | StreamClosed):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(is_link_loss(e) for e in exc.exceptions)
    return False


__all__ = [
    "Carrier",
    "ChannelConnection",
    "ConnectionHandler",
    "ConnectionLost",
    "MessageStream",
    "StreamClosed",
    "is_link_loss",
]
