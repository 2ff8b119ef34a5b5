"""The TCP carrier: the channel over HTTP/2 over TLS 1.3, on the event loop.

``TcpConnection`` is a ``ChannelConnection`` and an ``asyncio.Protocol``. Bytes from the socket
go through TLS (``TlsPipe``, sans-IO) into h2's sans-IO ``H2Connection``; its events become
channel-core input; what the sessions send is queued per stream and leaves at the end of the
loop turn (one flush per turn, like the QUIC ``Connection``), within the peer's flow-control
windows. The mapping (paths, headers, the parked requests that carry the controller's streams,
the bounds) is explained in ``margo_stream.transport.h2_mapping``.

A *lane* (``h2_mapping.Lane``) is one channel stream on this carrier: its channel id, its
HTTP/2 stream id once it has one, and what we queued on it. A lane goes when both directions
are over or it was reset.

The endpoint (``tcp_server``, ``tcp_client``) sets ``on_established`` (the TLS handshake
completed: the server checks the client's certificate there, before any request is read) and
``on_terminated``. The connection closes itself after ``idle_timeout`` seconds without a byte
from the peer (the agent pings well inside it, as on QUIC).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast

import h2.events as ev
import h2.exceptions
from h2.connection import H2Connection

from margo_stream.protocol.codes import ErrorCode, Sender
from margo_stream.transport import h2_mapping as hm
from margo_stream.transport.channel_connection import ChannelConnection
from margo_stream.transport.h2_mapping import Lane, describe_remote
from margo_stream.transport.tls_pipe import TlsPipe, tls_error_code, tls_error_text

log = logging.getLogger("margo.transport.tcp")

PING_DATA = b"margo\x00\x00\x00"
_H2Error = h2.exceptions.ProtocolError


class TcpConnection(ChannelConnection, asyncio.Protocol):
    carrier = "tcp"

    def __init__(
        self,
        role: Sender,
        loop: asyncio.AbstractEventLoop,
        ssl_context: ssl.SSLContext,
        *,
        server_name: str | None = None,
        idle_timeout: float = 60.0,
        max_frame: int = 1 << 20,
        reverse_pool: int = hm.REVERSE_POOL,
        max_parked: int = hm.MAX_PARKED,
    ) -> None:
        super().__init__(role, loop, max_frame=max_frame)
        self.is_client = role is Sender.AGENT
        self.tls = TlsPipe(ssl_context, server_side=not self.is_client, server_hostname=server_name)
        self.authority = server_name or "controller"
        self.idle_timeout = idle_timeout
        self.reverse_pool = reverse_pool
        self.max_parked = max_parked
        self.h2: H2Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.on_established: Callable[[TcpConnection], None] | None = None
        self.on_terminated: Callable[[TcpConnection], None] | None = None
        self.refused = 0  # requests refused on this connection (controller)
        self._lanes: dict[int, Lane] = {}
        self._by_h2: dict[int, Lane] = {}
        self._sendable: dict[int, None] = {}  # lanes with queued output, in order
        self._waiting: deque[Lane] = deque()  # lanes without an HTTP/2 stream yet
        self._parked: deque[int] = deque()  # controller: parked requests; agent: see _parked_out
        self._parked_out: set[int] = set()  # agent: our parked requests not answered yet
        self._next_local = 1 if self.is_client else 2  # ids of the streams we open
        self._next_peer = 2  # agent: ids of the controller's streams
        self._transmit_handle: asyncio.Handle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._bind_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._settings_seen = False
        self._frames = hm.FrameGuard(preface=not self.is_client)

    # --- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.remote = transport.get_extra_info("peername")
        if self.is_client:
            self._advance_tls()  # the ClientHello
            self.transmit()

    def data_received(self, data: bytes) -> None:
        if self.closed is not None:
            return
        self.last_received = self.loop.time()
        self.tls.feed(data)
        if not self.tls.established:
            if not self._advance_tls():
                self.transmit()
                return
        try:
            plain = self.tls.read()
        except ssl.SSLError as exc:
            self._tls_failed(exc)
            return
        if plain and self.h2 is not None:
            problem = self._frames.check(plain)
            if problem is not None:
                self._h2_refused(problem)
                return
            try:
                events = self.h2.receive_data(plain)
            except _H2Error as exc:  # h2 queued a GOAWAY with its code
                self._h2_failed(exc)
                return
            for event in events:
                if self.closed is not None or not self._guarded(
                    type(event).__name__, functools.partial(self._h2_event, event)
                ):
                    return
        if self.is_client and self._settings_seen and not self.handshake_done:
            # the server's SETTINGS: it speaks HTTP/2 (told after the rest of what came with
            # them, so that a GOAWAY refusing us right behind them is seen first)
            self._handshake_completed()
        if self.tls.peer_closed and self.closed is None:
            self._lost(ErrorCode.NO_ERROR, "the peer closed TLS")
            return
        self.schedule_transmit()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.closed is None:
            why = f"TCP connection lost: {exc}" if exc else "TCP connection closed by the peer"
            self._lost(ErrorCode.NO_ERROR, why)

    def pause_writing(self) -> None:
        # the socket is full: stop reading too, so that the peer cannot make us queue
        # answers (PING and SETTINGS acks, window updates) without bound
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self.transport is not None:
            self.transport.resume_reading()
        self.schedule_transmit()

    # --- TLS -------------------------------------------------------------------------------------
    def _advance_tls(self) -> bool:
        """Drive the handshake; True once established (the endpoint was told)."""
        try:
            if not self.tls.handshake():
                return False
        except ssl.SSLError as exc:
            self._tls_failed(exc)
            return False
        if self.tls.alpn != hm.ALPN_H2:
            self.close(
                ErrorCode.PROTOCOL_ERROR, f"ALPN {self.tls.alpn!r}: the TCP carrier speaks h2"
            )
            return False
        h2conn = self.h2 = H2Connection(hm.h2_configuration(client_side=self.is_client))
        h2conn.initiate_connection()
        h2conn.update_settings(hm.local_settings())  # in effect once the peer acknowledges
        h2conn.increment_flow_control_window(hm.CONNECTION_WINDOW - 65535)
        if self.on_established is not None:
            self.on_established(self)
        if self.closed is not None:
            return False
        self._idle = self.loop.call_later(self.idle_timeout, self._idle_check)
        if self.is_client:
            self._refill_pool()
        else:
            self._handshake_completed()  # the server's handshake: TLS and the identity check
        return True

    def _tls_failed(self, exc: ssl.SSLError) -> None:
        self._lost(tls_error_code(exc), f"TLS: {tls_error_text(exc)}", flush=True)

    def _h2_failed(self, exc: _H2Error) -> None:
        log.warning(
            "closing the connection from %s: HTTP/2: %s",
            describe_remote(self.remote),
            exc,
            extra={"event": "tcp-protocol-error", "remote": str(self.remote)},
        )
        self._lost(ErrorCode.PROTOCOL_ERROR, f"HTTP/2: {exc}", flush=True, by_peer=False)

    def _h2_refused(self, problem: str) -> None:
        log.warning(
            "closing the connection from %s: HTTP/2: %s",
            describe_remote(self.remote),
            problem,
            extra={"event": "connection-bounds", "remote": str(self.remote)},
        )
        self.close(ErrorCode.PROTOCOL_ERROR, f"HTTP/2: {problem}")

    def peer_certificate_der(self) -> bytes | None:
        return self.tls.peer_certificate_der()

    # --- HTTP/2 events ---------------------------------------------------------------------------
    def _h2_event(self, event: ev.Event) -> None:
        h2conn = self.h2
        assert h2conn is not None
        if isinstance(event, ev.DataReceived):
            sid = event.stream_id
            if event.flow_controlled_length:  # the core takes it now: reopen the window
                h2conn.acknowledge_received_data(event.flow_controlled_length, sid)
            lane = self._by_h2.get(sid)
            if lane is not None:
                self._protocol_events(self.core.receive(lane.cid, event.data or b"", False))
            elif event.data and sid in self._parked:  # no body before it is bound
                self._parked.remove(sid)
                self._refuse_stream(sid, ErrorCode.PROTOCOL_ERROR, "data on a parked request")
        elif isinstance(event, ev.RequestReceived):
            self._request(event)
        elif isinstance(event, ev.ResponseReceived):
            self._response(event)
        elif isinstance(event, ev.StreamEnded):
            self._stream_ended(event.stream_id)
        elif isinstance(event, ev.StreamReset):
            self._stream_reset(event.stream_id, int(event.error_code or 0))
        elif isinstance(event, ev.WindowUpdated):
            self.schedule_transmit()
        elif isinstance(event, ev.RemoteSettingsChanged):
            self._settings_seen = True
            self._open_waiting()
        elif isinstance(event, ev.ConnectionTerminated):
            code = int(event.error_code or 0)
            data = event.additional_data or b""
            self._lost(code, data.decode("utf-8", "replace") or "GOAWAY without a reason")

    def _stream_ended(self, sid: int) -> None:
        lane = self._by_h2.get(sid)
        if lane is None:
            if sid in self._parked:  # the agent withdrew a parked request
                self._parked.remove(sid)
                self._reset_h2(sid, ErrorCode.NO_ERROR)
            return
        lane.remote_done = True
        self._drop_if_done(lane)
        self._protocol_events(self.core.receive(lane.cid, b"", True))

    def _stream_reset(self, sid: int, code: int) -> None:
        self._parked_out.discard(sid)
        if sid in self._parked:
            self._parked.remove(sid)
        lane = self._by_h2.pop(sid, None)
        if lane is not None:
            self._lanes.pop(lane.cid, None)
            self._sendable.pop(lane.cid, None)
            self._protocol_events(self.core.reset_received(lane.cid, code))
        self._open_waiting()

    # --- the controller's side -------------------------------------------------------------------
    def _request(self, event: ev.RequestReceived) -> None:
        sid = event.stream_id
        kind = hm.classify_request(event.headers or [])
        if isinstance(kind, hm.Refusal):
            self._refuse_request(sid, kind)
        elif kind is hm.RequestKind.CHANNEL:
            lane = self._lanes[sid] = self._by_h2[sid] = Lane(sid, sid)
            assert self.h2 is not None
            self.h2.send_headers(sid, hm.response_headers())
            del lane  # its data and end arrive as events
        elif len(self._parked) >= self.max_parked:
            self._refuse_stream(
                sid, hm.REFUSED_STREAM, f"more than {self.max_parked} parked reverse requests"
            )
        else:
            self._parked.append(sid)
            self._bind_waiting()

    def _refuse_request(self, sid: int, refusal: hm.Refusal) -> None:
        assert self.h2 is not None
        headers, body = hm.refusal_response(refusal)
        if self.h2.local_flow_control_window(sid) < len(body):
            body = b""  # a peer that grants no window gets the header only
            headers = [(k, "0" if k == "content-length" else v) for k, v in headers]
        self.h2.send_headers(sid, headers, end_stream=not body)
        if body:
            self.h2.send_data(sid, body, end_stream=True)
        self._reset_h2(sid, ErrorCode.NO_ERROR)  # stop sending the body we will not read
        self._count_refusal(f"{refusal.status} {refusal.reason}")

    def _refuse_stream(self, sid: int, code: int, reason: str) -> None:
        self._reset_h2(sid, code)
        self._count_refusal(reason)

    def _count_refusal(self, reason: str) -> None:
        self.refused += 1
        level = logging.INFO if self.refused <= 3 else logging.DEBUG
        log.log(
            level,
            "refused a request from %s: %s",
            self.remote,
            reason,
            extra={"event": "tcp-request-refused", "remote": str(self.remote)},
        )
        if self.refused > hm.MAX_REFUSED:
            log.warning(
                "closing the connection from %s: %d requests refused",
                self.remote,
                self.refused,
                extra={"event": "connection-bounds", "remote": str(self.remote)},
            )
            self.close(ErrorCode.PROTOCOL_ERROR, f"more than {hm.MAX_REFUSED} requests refused")

    def _bind_waiting(self) -> None:
        """Controller: give waiting streams the parked requests."""
        h2conn = self.h2
        while self._waiting and self._parked and h2conn is not None:
            lane, sid = self._waiting.popleft(), self._parked.popleft()
            try:
                h2conn.send_headers(sid, hm.response_headers())
            except _H2Error:
                self._waiting.appendleft(lane)  # that request is gone: try the next one
                continue
            lane.h2id = sid
            self._by_h2[sid] = lane
            self.schedule_transmit()

    def _bind_check(self) -> None:
        self._bind_timer = None
        if not self._waiting or self.closed is not None:
            return
        waited = self.loop.time() - self._waiting[0].at
        if waited >= hm.BIND_TIMEOUT:
            self.close(
                ErrorCode.PROTOCOL_ERROR,
                f"no reverse request parked by the agent for {waited:.0f} s",
            )
        else:
            self._arm_bind_timer(hm.BIND_TIMEOUT - waited)

    def _arm_bind_timer(self, delay: float) -> None:
        if self._bind_timer is None:
            self._bind_timer = self.loop.call_later(delay, self._bind_check)

    # --- the agent's side -------------------------------------------------------------------------
    def _response(self, event: ev.ResponseReceived) -> None:
        sid = event.stream_id
        problem = hm.check_response(event.headers or [])
        lane = self._by_h2.get(sid)
        if lane is not None:
            if problem is not None:
                self._stream_broken(lane.cid, ErrorCode.PROTOCOL_ERROR, problem)
            return
        if sid not in self._parked_out:
            return
        self._parked_out.discard(sid)
        if problem is not None:
            log.warning(
                "the controller refused a reverse request: %s",
                problem,
                extra={"event": "tcp-reverse-refused"},
            )
            self._reset_h2(sid, ErrorCode.CANCELLED)  # not parked again: no loop
            return
        cid, self._next_peer = self._next_peer, self._next_peer + 2
        lane = self._lanes[cid] = self._by_h2[sid] = Lane(cid, sid)
        self._refill_pool()

    def _has_room(self) -> bool:
        h2conn = self.h2
        return (
            h2conn is not None
            and h2conn.open_outbound_streams < h2conn.remote_settings.max_concurrent_streams
        )

    def _open_waiting(self) -> None:
        """Agent: open the requests of waiting streams while HTTP/2 allows, then park."""
        if not self.is_client:
            return
        while self._waiting and self._has_room():
            self._open_request(self._waiting.popleft())
        self._refill_pool()

    def _open_request(self, lane: Lane) -> None:
        h2conn = self.h2
        assert h2conn is not None
        sid = h2conn.get_next_available_stream_id()
        h2conn.send_headers(sid, hm.request_headers(hm.RequestKind.CHANNEL, self.authority))
        lane.h2id = sid
        self._by_h2[sid] = lane
        self.schedule_transmit()

    def _refill_pool(self) -> None:
        h2conn = self.h2
        while (
            h2conn is not None
            and self.closed is None
            and not self._waiting
            and len(self._parked_out) < self.reverse_pool
            and self._has_room()
        ):
            sid = h2conn.get_next_available_stream_id()
            h2conn.send_headers(sid, hm.request_headers(hm.RequestKind.REVERSE, self.authority))
            self._parked_out.add(sid)
            self.schedule_transmit()

    # --- carrier hooks ---------------------------------------------------------------------------
    def _carrier_open(self) -> int:
        cid, self._next_local = self._next_local, self._next_local + 2
        lane = self._lanes[cid] = Lane(cid, at=self.loop.time())
        if self.is_client:
            if self._has_room() and not self._waiting:
                self._open_request(lane)
            else:
                self._waiting.append(lane)
            return cid
        if len(self._waiting) >= hm.MAX_WAITING:
            self.close(
                ErrorCode.PROTOCOL_ERROR,
                f"{len(self._waiting)} streams wait for a reverse request the agent never parks",
            )
            assert self.closed is not None
            raise self.closed
        self._waiting.append(lane)
        self._bind_waiting()
        if self._waiting:
            self._arm_bind_timer(hm.BIND_TIMEOUT)
        return cid

    def _carrier_send(self, stream_id: int, data: bytes, end: bool) -> None:
        lane = self._lanes.get(stream_id)
        if lane is None or lane.end_queued:
            return
        if data:
            lane.out.append(memoryview(data))
            lane.pending += len(data)
        lane.end_queued = end
        self._sendable[stream_id] = None

    def _carrier_finish(self, stream_id: int) -> None:
        self._carrier_send(stream_id, b"", True)
        self.schedule_transmit()

    def _carrier_reset(self, stream_id: int, code: int) -> None:
        lane = self._lanes.pop(stream_id, None)
        if lane is None:
            return
        self._sendable.pop(stream_id, None)
        if lane.h2id is None:
            with contextlib.suppress(ValueError):
                self._waiting.remove(lane)
            return
        self._by_h2.pop(lane.h2id, None)
        if not (lane.local_done and lane.remote_done):
            self._reset_h2(lane.h2id, code)

    def _reset_h2(self, sid: int, code: int) -> None:
        if self.h2 is not None:
            with contextlib.suppress(_H2Error):
                self.h2.reset_stream(sid, code)

    def forget_stream(self, stream_id: int) -> None:
        super().forget_stream(stream_id)
        lane = self._lanes.get(stream_id)
        if lane is not None and not lane.end_queued and self.closed is None:
            self._carrier_finish(stream_id)  # we are done with it: end our direction

    def _carrier_ping(self) -> None:
        if self.h2 is not None:
            self.h2.ping(PING_DATA)

    def _carrier_close(self, code: int, reason: str) -> None:
        if self.h2 is not None:
            with contextlib.suppress(_H2Error):
                self.h2.close_connection(error_code=code, additional_data=hm.close_reason(reason))
        self._flush(close_tls=True)

    # --- sending ---------------------------------------------------------------------------------
    def schedule_transmit(self) -> None:
        if self._transmit_handle is None and self.closed is None:
            self._transmit_handle = self.loop.call_soon(self._scheduled_transmit)

    def _scheduled_transmit(self) -> None:
        self._transmit_handle = None
        if self.closed is None:
            self.transmit()

    def transmit(self) -> None:
        if self._transmit_handle is not None:
            self._transmit_handle.cancel()
            self._transmit_handle = None
        if self.h2 is not None and not self._paused:
            self._pump()
        self._flush()

    def _flush(self, *, close_tls: bool = False) -> None:
        if self.h2 is not None and self.tls.established:
            data = self.h2.data_to_send()
            if data:
                self.tls.write(data)
        if close_tls and self.tls.established:
            self.tls.close()
        out = self.tls.output()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _pump(self) -> None:
        """Hand queued output to h2, stream by stream, within the peer's windows."""
        h2conn = self.h2
        assert h2conn is not None
        for cid in list(self._sendable):
            lane = self._lanes.get(cid)
            if lane is None:
                del self._sendable[cid]
                continue
            sid = lane.h2id
            if sid is None:
                continue  # waiting for an HTTP/2 stream
            try:
                while lane.pending:
                    window = min(
                        h2conn.local_flow_control_window(sid), h2conn.max_outbound_frame_size
                    )
                    if window <= 0:
                        break
                    chunk = lane.take(window)
                    last = lane.end_queued and not lane.pending
                    h2conn.send_data(sid, chunk, end_stream=last)
                    lane.local_done = last
                if not lane.pending:
                    if lane.end_queued and not lane.local_done:
                        h2conn.end_stream(sid)
                        lane.local_done = True
                    del self._sendable[cid]
            except _H2Error:  # the stream closed under us (its reset event follows)
                self._sendable.pop(cid, None)
                continue
            self._drop_if_done(lane)

    def _drop_if_done(self, lane: Lane) -> None:
        if lane.local_done and lane.remote_done:
            self._lanes.pop(lane.cid, None)
            if lane.h2id is not None:
                self._by_h2.pop(lane.h2id, None)
            self._open_waiting()

    # --- lifecycle ---------------------------------------------------------------------------------
    def _idle_check(self) -> None:
        self._idle = None
        if self.closed is not None:
            return
        silent = self.loop.time() - self.last_received
        if silent >= self.idle_timeout:
            self.close(ErrorCode.NO_ERROR, f"idle timeout: nothing received for {silent:.0f} s")
        else:
            self._idle = self.loop.call_later(self.idle_timeout - silent, self._idle_check)

    def _lost(self, code: int, reason: str, *, flush: bool = False, by_peer: bool = True) -> None:
        """The carrier is over without our ``close``: a GOAWAY, an error, the socket."""
        if flush:
            self._flush()  # an alert or h2's GOAWAY, when there is one
        self._terminated(code, reason, by_peer=by_peer)

    def _terminated(self, code: int, reason: str, *, by_peer: bool) -> None:
        if self.closed is not None:
            return
        super()._terminated(code, reason, by_peer=by_peer)
        for timer in (self._idle, self._bind_timer, self._transmit_handle):
            if timer is not None:
                timer.cancel()
        self._idle = self._bind_timer = self._transmit_handle = None
        self._lanes.clear()
        self._by_h2.clear()
        self._sendable.clear()
        self._waiting.clear()
        self._parked.clear()
        self._parked_out.clear()
        self.h2 = None  # its stream table goes with it
        if self.transport is not None:
            self.transport.close()
        if self.on_terminated is not None:
            self.on_terminated(self)

    @property
    def lanes(self) -> int:
        """Channel streams this carrier holds (for tests and counters)."""
        return len(self._lanes)

    @property
    def parked(self) -> int:
        """Parked reverse requests: held (controller) or waiting for an answer (agent)."""
        return len(self._parked) if not self.is_client else len(self._parked_out)
