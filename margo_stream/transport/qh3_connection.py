"""The agent's QUIC on qh3: the channel carried by qh3's sans-IO ``QuicConnection``, whose
packet handling (frames, ACKs, loss recovery, flow control, packet protection) runs in native
code, driven by the event loop like ``margo_stream.transport.connection.Connection``.

Why a second QUIC stack: aioquic handles every packet in Python. A device's side of a push's
packets cost about 106 us of CPU a datagram with aioquic and 19 us with qh3 (sans-IO:
``margo-bench quic-stacks``; bench/RESULTS.md, issue 20), and a device pays that for every push
it takes, every status it sends and every ACK. qh3 is the agent's default
(``margo_stream.transport.quic_stack``). The controller stays on aioquic (its
client-certificate check, connection-ID routing, Retry and stateless resets hook into aioquic:
``mtls_hook``); the two interoperate as any two QUIC implementations do.

What qh3 decides for itself, and what is ours:
- congestion control is qh3's own (loss-based); ``--congestion-control`` (our ``rate``
  controller) applies to the aioquic stack only, and given alone selects it: for an agent
  that sends bulk telemetry over a link that loses packets at random.
- ACKs: qh3 acknowledges a packet that ends a stream at once (every push ends its stream) and
  others 1 ms after. We hold its timer to ``ACK_HOLD`` after the datagram, as the aioquic
  stack holds its ACKs (``mtls_hook.hold_acks``), so the answer to a push carries the push's
  ACK instead of a datagram of its own; only a flow of data (``ACK_EVERY`` datagrams since we
  last sent) is acknowledged at once. qh3 does not say why it wants an ACK now, so a packet
  after a gap in the packet numbers is acknowledged within ``ACK_HOLD`` too, where the aioquic
  stack answers it at once; the peer learns of a loss up to 5 ms later.
- datagrams are at most ``max_datagram_size`` (1,350 bytes) as on the aioquic stack: qh3's
  path-MTU probing is off (it sent a padded 1,472-byte probe after a connection's first
  exchange, which the controller then had to acknowledge).
- receive buffers are bounded by the flow-control windows we advertise (``max_data`` for the
  connection, ``max_stream_data`` per stream, reassembly included).
- the controller's certificate chain is verified by qh3 against the device's bundle (the
  tenant's CA) with the server name checked; what the leaf claims is checked after the
  handshake by the same code as for every carrier (``agent.carriers.controller_identity``).

All of qh3 is used here and nowhere else (tests/unit/test_architecture.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from qh3.quic import events as qe
from qh3.quic.configuration import QuicConfiguration as Qh3Configuration
from qh3.quic.connection import QuicConnection as Qh3QuicConnection

from margo_stream.protocol.codes import ALPN, Sender
from margo_stream.transport.mtls_hook import ACK_HOLD  # one hold for both stacks
from margo_stream.transport.quic_client import dial_udp
from margo_stream.transport.quic_streams import QuicStreamsCarrier

ACK_EVERY = 4  # datagrams since we last sent after which an ACK goes at once (a flow of data)

__all__ = [
    "ACK_EVERY",
    "ACK_HOLD",
    "Qh3Configuration",
    "Qh3Connection",
    "Qh3QuicConnection",
    "connect_qh3",
    "qh3_configuration",
]


def qh3_configuration(
    cert_path: str,
    key_path: str,
    ca_path: str,
    *,
    server_name: str,
    idle_timeout: float = 60.0,
    max_datagram_size: int = 1350,
) -> Qh3Configuration:
    """The agent's side: its certificate and key (mutual TLS), the bundle it verifies the
    controller's chain against, and the same limits as the aioquic stack's configuration."""
    configuration = Qh3Configuration(
        is_client=True,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        server_name=server_name,
        max_datagram_size=max_datagram_size,
        max_data=4 << 20,
        max_stream_data=1 << 20,
        # no path-MTU probes: the aioquic stack's fixed datagram size, and no padded probe
        # (and the controller's ACK of it) after the first exchange of every connection
        probe_datagram_size=False,
    )
    configuration.load_cert_chain(cert_path, key_path)
    configuration.load_verify_locations(cafile=ca_path)
    return configuration


class Qh3Connection(QuicStreamsCarrier):
    """Drives one qh3 ``QuicConnection``. ``sendto`` puts one datagram on the wire."""

    carrier = "quic"
    quic: Qh3QuicConnection

    def __init__(
        self,
        quic: Qh3QuicConnection,
        role: Sender,
        sendto: Callable[[bytes, Any], None],
        loop: asyncio.AbstractEventLoop,
        *,
        max_frame: int = 1 << 20,
    ) -> None:
        super().__init__(role, loop, max_frame=max_frame)
        self.quic = quic
        self._sendto = sendto
        self._hold_until = 0.0  # no timer before this (the ACK hold of the last datagram)
        self._received = 0  # datagrams received since we last sent one
        self.on_terminated: Callable[[Qh3Connection], None] | None = None

    # --- network side ---------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = self.loop.time()
        self.last_received = now
        self.remote = addr
        self.quic.receive_datagram(data, addr, now=now)
        self._drain_events()
        if not self.handshake_done:
            self.schedule_transmit()  # the handshake's flights go at once
            return
        # What our handlers wrote has asked for this turn's flush. Nothing else is sent now
        # unless data keeps coming: the core's ACK waits up to ACK_HOLD for a reply to ride
        # with, and what it queues by itself (a stream credit after a stream closed) rides with
        # the next packet we send anyway.
        self._received += 1
        self._hold_until = now + ACK_HOLD
        if self._received >= ACK_EVERY:
            self.schedule_transmit()
        else:
            self._schedule_timer()

    def transmit(self) -> None:
        self._take_queued_flush()
        sendto = self._sendto
        for data, addr in self.quic.datagrams_to_send(now=self.loop.time()):
            sendto(data, addr)
            self._received = 0
        self._schedule_timer()

    def _schedule_timer(self) -> None:
        timer_at = self.quic.get_timer()
        if timer_at is not None and timer_at < self._hold_until:
            timer_at = self._hold_until  # an ACK waits for a reply to ride with
        self._set_loop_timer(timer_at)

    def schedule_transmit(self) -> None:
        self._queue_flush()

    # --- QUIC events ------------------------------------------------------------------------------
    def quic_event(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.ConnectionTerminated):
            self.cancel_timer()
            # qh3 ends a connection with no code and no reason for a stateless reset (a
            # restarted controller answering an old connection) and for the idle timeout
            reason = event.reason_phrase or (
                "ended by the QUIC stack: a stateless reset (the controller restarted?) "
                "or the idle timeout"
            )
            self._terminated(event.error_code, reason, by_peer=True)
            if self.on_terminated is not None:
                self.on_terminated(self)
            return
        if self.closed is not None:
            return
        if isinstance(event, qe.StreamDataReceived):
            self._protocol_events(self.core.receive(event.stream_id, event.data, event.end_stream))
        elif isinstance(event, qe.StreamReset):
            self._protocol_events(self.core.reset_received(event.stream_id, event.error_code))
        elif isinstance(event, qe.HandshakeCompleted):
            self.handshake_done = True
            self._handshake_completed()

    # --- carrier hooks (the rest: QuicStreamsCarrier) ----------------------------------------------
    def peer_certificate_der(self) -> bytes | None:
        cert = self.quic.get_peercert()
        return None if cert is None else cert.public_bytes()


async def connect_qh3(
    host: str, port: int, configuration: Qh3Configuration
) -> tuple[Qh3Connection, asyncio.DatagramTransport]:
    """Start a handshake (as ``quic_client.connect`` does for the aioquic stack); the caller
    awaits ``connection.wait_handshake()`` with a timeout and closes the transport after."""
    loop = asyncio.get_running_loop()

    def make(transport: asyncio.DatagramTransport, addr: Any) -> Qh3Connection:
        quic = Qh3QuicConnection(configuration=configuration)
        conn = Qh3Connection(quic, Sender.AGENT, transport.sendto, loop)
        quic.connect(addr, now=loop.time())
        conn.transmit()
        return conn

    return await dial_udp(host, port, make)
