"""The controller's UDP endpoint: routes datagrams to connections by connection ID, creates
mutual-TLS server connections for new Initial packets, and checks the client's identity the
moment the handshake completes, before any stream is accepted.

Connections whose identity check fails are closed with ``IDENTITY_REFUSED`` and the reason
(logged, and sent to the client in CONNECTION_CLOSE); their stream data is never parsed.

Before a new Initial creates anything, ``HalfOpenPolicy`` (``half_open.py``) decides: take it
up, answer with a stateless Retry (``retry.py``: the client must prove its address), or drop
it. Every new connection gets a deadline ``handshake_timeout`` seconds out; one whose handshake
(identity check included) has not completed by then is forgotten: silently when nothing it
sent was ever decrypted (a garbage or spoofed Initial gets no answer, so nothing is reflected),
else after a CONNECTION_CLOSE. So half-open state lasts seconds, not the idle timeout, and a
flood of Initials costs a bounded number of connections. Forgotten connections are reported
to the collector policy (``gcpolicy.connections_released``), which sweeps after a mass
disconnect and hands the memory back.

``counters``: ``retries`` (Retry packets sent), ``tokens_refused`` (Initials whose token did
not open, expired or named another connection ID), ``half_open_dropped`` (Initials the caps
dropped), ``half_open_expired`` (handshakes timed out); ``half_open_now`` is how many are
in progress.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic import events as qe
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.packet import (
    QuicHeader,
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from margo_stream.errors import PeerRejected
from margo_stream.gcpolicy import connection_opened, connections_released
from margo_stream.protocol.codes import ALPN, ErrorCode, Sender
from margo_stream.transport.congestion import DEFAULT_CONGESTION_CONTROL
from margo_stream.transport.connection import Connection
from margo_stream.transport.endpoint_clock import EndpointClock
from margo_stream.transport.half_open import Decision, HalfOpenPolicy, RetryMode
from margo_stream.transport.mtls_hook import (
    CertificateChooser,
    MutualTlsServerConnection,
    check_aioquic,
    take_client_chain,
)
from margo_stream.transport.retry import InvalidToken, RetryTokens, Validated
from margo_stream.transport.stateless_reset import ResetTokens
from margo_stream.transport.udp_buffers import size_buffers

log = logging.getLogger("margo.quic.server")

# verify(leaf, chain) -> identity, raising PeerRejected
Verifier = Callable[[Any, list[Any]], Any]
# accept(connection, identity): the session layer takes the connection over
Acceptor = Callable[[Connection, Any], None]

MIN_INITIAL_DCID = 8  # RFC 9000 7.2: a client's first destination connection ID
PRESSURE_LOG_EVERY = 10.0  # seconds between the summaries of refused and expired handshakes
EXPIRY_GRANULARITY = 0.1  # half-open deadlines are checked at most this often


def server_configuration(
    cert_path: str,
    key_path: str,
    *,
    idle_timeout: float = 60.0,
    max_datagram_size: int = 1350,
    congestion_control: str = DEFAULT_CONGESTION_CONTROL,
) -> QuicConfiguration:
    configuration = QuicConfiguration(
        is_client=False,
        congestion_control_algorithm=congestion_control,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size,
        max_data=4 << 20,
        max_stream_data=1 << 20,
    )
    configuration.load_cert_chain(cert_path, key_path)
    return configuration


class QuicServer(asyncio.DatagramProtocol):
    def __init__(
        self,
        configuration: QuicConfiguration,
        verify: Verifier,
        accept: Acceptor,
        *,
        max_connections: int = 50_000,
        reset_tokens: ResetTokens | None = None,
        choose_certificate: CertificateChooser | None = None,
        quic_retry: RetryMode | str = RetryMode.AUTO,
        handshake_timeout: float = 5.0,
        max_half_open: int = 2048,
        max_half_open_per_address: int = 256,
    ) -> None:
        check_aioquic()
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be > 0 seconds")
        # per connection: the certificate of the tenant the client's server name names (None:
        # always the configuration's, DIR/controller/)
        self.choose_certificate = choose_certificate
        self.configuration = configuration
        self.verify = verify
        self.accept = accept
        self.max_connections = max_connections
        self.reset_tokens = reset_tokens
        self.loop = asyncio.get_running_loop()
        self.clock = EndpointClock(self.loop)  # every connection's deadlines and transmits
        self._cid_length = configuration.connection_id_length
        self.transport: asyncio.DatagramTransport | None = None
        self._by_cid: dict[bytes, Connection] = {}
        self._connections: set[Connection] = set()
        self.half_open = HalfOpenPolicy(
            RetryMode(quic_retry),
            max_half_open=max_half_open,
            max_half_open_per_address=max_half_open_per_address,
        )
        self.handshake_timeout = handshake_timeout
        self.retry_tokens = RetryTokens()
        # connections whose handshake is in progress: (source IP, validated by a token)
        self._half_open: dict[Connection, tuple[str, bool]] = {}
        # (deadline, connection) in creation order: deadlines only grow
        self._deadlines: deque[tuple[float, Connection]] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._pressure_logged = -PRESSURE_LOG_EVERY
        self._pressure_timer: asyncio.TimerHandle | None = None
        self._pressure_seen: dict[str, int] = {}
        self.counters = {
            "handshakes": 0,
            "refused": 0,
            "accepted": 0,
            "dropped_datagrams": 0,
            "stateless_resets": 0,
            "retries": 0,
            "tokens_refused": 0,
            "half_open_dropped": 0,
            "half_open_expired": 0,
        }

    # --- asyncio.DatagramProtocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data and not data[0] & 0x80:
            # a short header (RFC 9000 17.3): the destination connection ID is the bytes after
            # the first, of the length we issue; a known one goes straight to its connection
            # (which parses the header itself), anything else takes the full path below
            conn = self._by_cid.get(data[1 : 1 + self._cid_length])
            if conn is not None:
                conn.datagram_received(data, addr)
                return
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self.configuration.connection_id_length
            )
        except ValueError:
            self.counters["dropped_datagrams"] += 1
            return
        conn = self._by_cid.get(header.destination_cid)
        if conn is None:
            if (
                header.version is not None
                and header.packet_type != QuicPacketType.VERSION_NEGOTIATION
                and header.version not in self.configuration.supported_versions
            ):
                self._sendto(
                    encode_quic_version_negotiation(
                        source_cid=header.destination_cid,
                        destination_cid=header.source_cid,
                        supported_versions=self.configuration.supported_versions,
                    ),
                    addr,
                )
                return
            if header.version is None and self.reset_tokens is not None:
                # a connection we do not know (we restarted, or forgot it): tell the peer now
                reset = self.reset_tokens.reset_for(header.destination_cid, len(data))
                if reset is not None:
                    self.counters["stateless_resets"] += 1
                    self._sendto(reset, addr)
                    return
            if (
                header.packet_type != QuicPacketType.INITIAL
                or len(data) < SMALLEST_MAX_DATAGRAM_SIZE
                or len(header.destination_cid) < MIN_INITIAL_DCID
                or len(self._connections) >= self.max_connections
            ):
                self.counters["dropped_datagrams"] += 1
                return
            conn = self._admit(header, addr)
            if conn is None:
                return
        conn.datagram_received(data, addr)

    def _sendto(self, data: bytes, addr: Any) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    # --- address validation and half-open handshakes ------------------------------------------
    def _admit(self, header: QuicHeader, addr: Any) -> Connection | None:
        """A new Initial from ``addr``: its connection, or ``None`` when it was answered with
        a Retry or dropped."""
        now = self.loop.time()
        validated: Validated | None = None
        if header.token:
            try:
                validated = self.retry_tokens.validate(addr, header.token, now)
            except InvalidToken:
                validated = None
            if validated is None or validated.retry_source_cid != header.destination_cid:
                # RFC 9000 8.1.2 allows dropping it; its sender already used its one Retry
                self.counters["tokens_refused"] += 1
                self._pressure(now)
                return None
        ip = str(addr[0])
        decision = self.half_open.decide(ip, validated is not None, now)
        if decision is Decision.RETRY:
            assert header.version is not None  # an Initial has a long header
            self._sendto(
                self.retry_tokens.retry_packet(
                    addr,
                    version=header.version,
                    client_cid=header.source_cid,
                    original_destination_cid=header.destination_cid,
                    now=now,
                    cid_length=self.configuration.connection_id_length,
                ),
                addr,
            )
            self.counters["retries"] += 1
            if self.half_open.mode is RetryMode.AUTO:
                self._pressure(now)
            return None
        if decision is Decision.DROP:
            self.counters["half_open_dropped"] += 1
            self._pressure(now)
            return None
        conn = self._new_connection(header.destination_cid, validated)
        self._half_open[conn] = (ip, validated is not None)
        self.half_open.opened(ip, validated is not None)
        self._deadlines.append((now + self.handshake_timeout, conn))
        if self._expiry is None:
            self._expiry = self.loop.call_at(self._deadlines[0][0], self._expire)
        return conn

    def _end_half_open(self, conn: Connection) -> bool:
        entry = self._half_open.pop(conn, None)
        if entry is not None:
            self.half_open.closed(*entry)
        return entry is not None

    def _expire(self) -> None:
        """Forget every connection whose handshake has not completed by its deadline."""
        self._expiry = None
        now = self.loop.time()
        deadlines = self._deadlines
        expired = 0
        while deadlines and deadlines[0][0] <= now:
            _, conn = deadlines.popleft()
            if not self._end_half_open(conn):
                continue  # its handshake completed, or it ended, in time
            expired += 1
            # a peer we heard a ClientHello from is told; one whose packets never decrypted
            # (garbage, perhaps spoofed) gets nothing: no datagram reflected at its source
            if _client_hello_seen(conn):
                conn.close(ErrorCode.HELLO_TIMEOUT, "handshake not completed in time")
            self._forget(conn)
        if expired:
            self.counters["half_open_expired"] += expired
            self._pressure(now)
        if deadlines:
            at = max(deadlines[0][0], now + EXPIRY_GRANULARITY)
            self._expiry = self.loop.call_at(at, self._expire)

    def _pressure(self, now: float) -> None:
        """Something was refused or timed out: one line on it now, or at the end of the
        ``PRESSURE_LOG_EVERY`` seconds since the last line (what happened meanwhile)."""
        if self._pressure_timer is not None:
            return
        wait = self._pressure_logged + PRESSURE_LOG_EVERY - now
        if wait <= 0:
            self._report_pressure()
        else:
            self._pressure_timer = self.loop.call_later(wait, self._report_pressure)

    def _report_pressure(self) -> None:
        self._pressure_timer = None
        self._pressure_logged = self.loop.time()
        keys = ("retries", "tokens_refused", "half_open_dropped", "half_open_expired")
        delta = {k: self.counters[k] - self._pressure_seen.get(k, 0) for k in keys}
        self._pressure_seen = {k: self.counters[k] for k in keys}
        log.warning(
            "handshakes under pressure (%s): %d half-open now; since the last report: "
            "%d Retry sent, %d tokens refused, %d dropped by the caps, %d timed out",
            self.half_open.mode.value,
            self.half_open.total,
            delta["retries"],
            delta["tokens_refused"],
            delta["half_open_dropped"],
            delta["half_open_expired"],
            extra={"event": "quic-half-open", "half_open": self.half_open.total, **delta},
        )

    # --- connections ---------------------------------------------------------------------------------
    def _new_connection(self, route_cid: bytes, validated: Validated | None) -> Connection:
        quic = MutualTlsServerConnection(
            configuration=self.configuration,
            original_destination_connection_id=(
                route_cid if validated is None else validated.original_destination_cid
            ),
            retry_source_connection_id=None if validated is None else validated.retry_source_cid,
            reset_tokens=self.reset_tokens,
            choose_certificate=self.choose_certificate,
        )
        conn = Connection(quic, Sender.CONTROLLER, self._sendto, self.loop, clock=self.clock)
        conn.on_handshake = self._handshake_completed
        conn.on_terminated = self._forget
        conn.on_cid_event = self._cid_event
        self._connections.add(conn)
        connection_opened()
        conn.route_ids.update((quic.host_cid, route_cid))
        for cid in conn.route_ids:
            self._by_cid[cid] = conn
        return conn

    def _cid_event(self, conn: Connection, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.ConnectionIdIssued):
            conn.route_ids.add(event.connection_id)
            self._by_cid[event.connection_id] = conn
        elif isinstance(event, qe.ConnectionIdRetired):
            conn.route_ids.discard(event.connection_id)
            if self._by_cid.get(event.connection_id) is conn:
                del self._by_cid[event.connection_id]

    def _handshake_completed(self, conn: Connection, event: qe.HandshakeCompleted) -> None:
        self.counters["handshakes"] += 1
        self._end_half_open(conn)  # whatever the identity check says, it is no longer half-open
        leaf, chain = take_client_chain(conn.quic)  # read once, here
        try:
            if event.alpn_protocol != ALPN:
                raise PeerRejected(f"ALPN {event.alpn_protocol!r} is not {ALPN!r}")
            identity = self.verify(leaf, chain)
        except PeerRejected as exc:
            self.counters["refused"] += 1
            addr = conn.remote
            log.warning(
                "refused connection from %s: %s",
                addr,
                exc.reason,
                extra={"event": "peer-refused", "remote": str(addr), "reason": exc.reason},
            )
            conn.close(ErrorCode.IDENTITY_REFUSED, exc.reason)
            return
        self.counters["accepted"] += 1
        self.accept(conn, identity)

    def _forget(self, conn: Connection) -> None:
        conn.cancel_timer()
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        self._end_half_open(conn)
        for cid in conn.route_ids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        conn.route_ids.clear()
        connections_released()

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def half_open_now(self) -> int:
        """Handshakes in progress (connections created, identity not yet checked)."""
        return self.half_open.total

    def close_all(self, code: int, reason: str) -> None:
        for timer in (self._expiry, self._pressure_timer):
            if timer is not None:
                timer.cancel()
        self._expiry = self._pressure_timer = None
        for conn in list(self._connections):
            conn.close(code, reason)


def _client_hello_seen(conn: Connection) -> bool:
    """Something this connection received was decrypted: its TLS context got past waiting for
    the ClientHello (aioquic builds the context on the first Initial, decryptable or not)."""
    context: tls.Context | None = getattr(conn.quic, "tls", None)
    return context is not None and context.state is not tls.State.SERVER_EXPECT_CLIENT_HELLO


async def start_server(
    host: str,
    port: int,
    configuration: QuicConfiguration,
    verify: Verifier,
    accept: Acceptor,
    *,
    reset_tokens: ResetTokens | None = None,
    choose_certificate: CertificateChooser | None = None,
    quic_retry: RetryMode | str = RetryMode.AUTO,
    handshake_timeout: float = 5.0,
    max_half_open: int = 2048,
    max_half_open_per_address: int = 256,
    reuse_port: bool = False,
) -> tuple[asyncio.DatagramTransport, QuicServer]:
    """Listen on ``host:port``; with ``reuse_port`` the socket joins an SO_REUSEPORT group
    (``margo-controller --workers``: the kernel hashes each client's address to one worker)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    size_buffers(sock)
    sock.bind((host, port))
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: QuicServer(
            configuration,
            verify,
            accept,
            reset_tokens=reset_tokens,
            choose_certificate=choose_certificate,
            quic_retry=quic_retry,
            handshake_timeout=handshake_timeout,
            max_half_open=max_half_open,
            max_half_open_per_address=max_half_open_per_address,
        ),
        sock=sock,
    )
    return transport, protocol
