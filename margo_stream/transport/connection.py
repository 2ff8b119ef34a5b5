"""One QUIC connection as the sessions see it: the channel (``ChannelConnection``, in
``margo_stream.transport.channel_connection``) carried by aioquic's sans-IO ``QuicConnection``,
driven by the event loop.

``Connection`` owns the aioquic state machine and its timer; it turns QUIC events into protocol
events through the base's ``ChannelCore`` and hands them to its ``ConnectionHandler``. Sends are
coalesced: many messages written in one loop turn leave in as few packets as possible (one
transmit per turn). A channel stream is a QUIC bidirectional stream with the same id; an end is
a FIN, a reset is RESET_STREAM plus STOP_SENDING with our error code, a close is
CONNECTION_CLOSE with our code and reason.

The names sessions import from here (``MessageStream``, ``ConnectionLost``, ``StreamClosed``,
``ConnectionHandler``, ``is_link_loss``) live in the base module and are re-exported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives.serialization import Encoding

from margo_stream.errors import ProtocolError
from margo_stream.protocol.codes import ErrorCode, Sender
from margo_stream.transport.channel_connection import (
    DEFAULT_QUEUE,
    ChannelConnection,
    ConnectionHandler,
    ConnectionLost,
    MessageStream,
    StreamClosed,
    is_link_loss,
)
from margo_stream.transport.endpoint_clock import EndpointClock
from margo_stream.transport.mtls_hook import (
    ack_due_now,
    ack_ranges,
    count_losses,
    hold_acks,
    nothing_to_send,
    peer_certificates,
    peer_reset_tokens,
    pure_acks_unacknowledged,
    receipt_mark,
    release_handshake_buffers,
    use_own_pacer,
)
from margo_stream.transport.quic_streams import QuicStreamsCarrier
from margo_stream.transport.stateless_reset import is_reset

log = logging.getLogger("margo.transport")

ACK_EVERY = 4  # packets with stream data after which an ACK is due at once (mtls_hook: why)
ELICIT_AFTER = 8  # pure ACKs of ours left unacknowledged before an answer carries a PING


class Connection(QuicStreamsCarrier):
    """Drives one ``QuicConnection``. ``sendto`` puts one datagram on the wire."""

    carrier = "quic"
    quic: QuicConnection

    def __init__(
        self,
        quic: QuicConnection,
        role: Sender,
        sendto: Callable[[bytes, Any], None],
        loop: asyncio.AbstractEventLoop,
        *,
        max_frame: int = 1 << 20,
        clock: EndpointClock | None = None,
    ) -> None:
        super().__init__(role, loop, max_frame=max_frame)
        use_own_pacer(quic)  # the rate controller's pacing (rate_cc: why)
        self.quic = quic
        self._sendto = sendto
        # the endpoint's clock (the controller's server: one heap of deadlines and one flush
        # per loop turn for all its connections), or None: a loop timer and handle of our own
        self.clock = clock
        self.clock_seq: int | None = None
        self.clock_at: float | None = None
        self.transmit_queued = False
        # endpoint hooks (server: identity check at handshake; both: drop state at the end)
        self.on_handshake: Callable[[Connection, qe.HandshakeCompleted], None] | None = None
        self.on_terminated: Callable[[Connection], None] | None = None
        self.on_cid_event: Callable[[Connection, qe.QuicEvent], None] | None = None
        self.route_ids: set[bytes] = set()  # connection IDs the endpoint routes to us
        self._replying = False  # stream data written since the last transmit
        self._data_in = False  # stream data among the events being drained
        self._held = 0  # packets with stream data received since our last transmit
        self._losses = 0  # times the recovery declared packets lost (mtls_hook: count_losses)
        count_losses(quic, self._count_loss)

    # --- network side ---------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = self.loop.time()
        self.last_received = now
        self.remote = addr
        losses = self._losses
        agent = self.role is Sender.AGENT  # only the agent looks for stateless resets
        mark = receipt_mark(self.quic) if agent else None
        ranges = ack_ranges(self.quic)
        self.quic.receive_datagram(data, addr, now=now)
        if (
            agent
            and receipt_mark(self.quic) == mark
            and is_reset(data, peer_reset_tokens(self.quic))
        ):
            # nothing of the datagram was taken and it ends in the controller's token: the
            # controller no longer knows this connection (it restarted). RFC 9000 10.3.1: the
            # connection is over and nothing more is sent on it
            self.cancel_timer()
            self._terminated(
                ErrorCode.NO_ERROR,
                "stateless reset: the controller no longer knows this connection (restarted?)",
                by_peer=True,
            )
            if self.on_terminated is not None:
                self.on_terminated(self)
            return
        self._data_in = False
        self._drain_events()
        if self._data_in:
            self._held += 1
        if not self._data_in or self._held >= ACK_EVERY or ack_ranges(self.quic) != ranges:
            # nothing we would answer (a keepalive PING, ACKs), a flow of data (a bulk
            # transfer), or a gap opened or filled (a loss the sender should learn of now):
            # acknowledge in this turn
            ack_due_now(self.quic)
            if not self._data_in and pure_acks_unacknowledged(self.quic) >= ELICIT_AFTER:
                # a peer that only pings never acknowledges our answers: ask it to, or
                # aioquic keeps each of them (mtls_hook, point 11)
                self.quic.send_ping(0)
        if (
            not self._data_in
            and not self._replying
            and losses == self._losses
            and not self.transmit_queued
            and self._transmit_handle is None
            and nothing_to_send(self.quic, now)
        ):
            # a pure ACK, most often: nothing to build (mtls_hook: nothing_to_send), but its
            # loss-detection deadline may have moved
            self._schedule_timer()
            return
        # Answer at the end of this loop turn, not per datagram: a peer's flight that spans
        # several datagrams gets one reply, and what our side sends in reaction to these
        # events (a hello right after the handshake, a HelloAck) rides in the same packets
        # as the ACKs and the handshake's last flight.
        self.schedule_transmit()

    def _count_loss(self) -> None:
        self._losses += 1

    def process_events(self) -> None:
        self._drain_events()
        self.transmit()

    def transmit(self) -> None:
        self.transmit_queued = False  # this call does the clock's queued flush's work
        self._take_queued_flush()
        sendto = self._sendto
        if self._replying:  # what we send carries the ACK we hold (mtls_hook: ack_due_now)
            self._replying = False
            ack_due_now(self.quic)
        for data, addr in self.quic.datagrams_to_send(now=self.loop.time()):
            sendto(data, addr)
            self._held = 0
        self._schedule_timer()

    def _schedule_timer(self) -> None:
        timer_at = self.quic.get_timer()
        if self.clock is not None:
            self.clock.schedule(self, timer_at)
        else:
            self._set_loop_timer(timer_at)

    def schedule_transmit(self) -> None:
        if self.clock is not None:
            self.clock.queue_transmit(self)
        else:
            self._queue_flush()

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
            self._data_in = True
            self._protocol_events(self.core.receive(event.stream_id, event.data, event.end_stream))
        elif isinstance(event, qe.ConnectionIdIssued | qe.ConnectionIdRetired):
            if self.on_cid_event is not None:
                self.on_cid_event(self, event)
        elif isinstance(event, qe.StreamReset):
            self._protocol_events(self.core.reset_received(event.stream_id, event.error_code))
        elif isinstance(event, qe.HandshakeCompleted):
            self.handshake_done = True
            hold_acks(self.quic)  # from now on (mtls_hook: why, and why not before)
            release_handshake_buffers(self.quic)  # a server's: 48 KiB it no longer needs
            if self.on_handshake is not None:
                self.on_handshake(self, event)
            self._handshake_completed()

    # --- carrier hooks ------------------------------------------------------------------------------
    def _carrier_send(self, stream_id: int, data: bytes, end: bool) -> None:
        self._replying = True
        super()._carrier_send(stream_id, data, end)

    def _carrier_finish(self, stream_id: int) -> None:
        self._replying = True
        super()._carrier_finish(stream_id)

    def peer_certificate_der(self) -> bytes | None:
        leaf, _ = peer_certificates(self.quic)
        return None if leaf is None else leaf.public_bytes(Encoding.DER)

    def cancel_timer(self) -> None:
        if self.clock is not None:
            self.clock.discard(self)
        super().cancel_timer()


__all__ = [
    "DEFAULT_QUEUE",
    "ChannelConnection",
    "Connection",
    "ConnectionHandler",
    "ConnectionLost",
    "MessageStream",
    "StreamClosed",
    "ProtocolError",
    "is_link_loss",
]
