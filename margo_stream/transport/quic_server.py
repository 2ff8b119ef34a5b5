"""The controller's UDP endpoint: routes datagrams to connections by connection ID, creates
mutual-TLS server connections for new Initial packets, and checks the client's identity the
moment the handshake completes, before any stream is accepted.

Connections whose identity check fails are closed with ``IDENTITY_REFUSED`` and the reason
(logged, and sent to the client in CONNECTION_CLOSE); their stream data is never parsed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic import events as qe
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from margo_stream.errors import PeerRejected
from margo_stream.protocol.codes import ALPN, ErrorCode, Sender
from margo_stream.transport.connection import Connection
from margo_stream.transport.mtls_hook import (
    CertificateChooser,
    MutualTlsServerConnection,
    check_aioquic,
    peer_certificates,
)
from margo_stream.transport.stateless_reset import ResetTokens
from margo_stream.transport.udp_buffers import size_buffers

log = logging.getLogger("margo.quic.server")

# verify(leaf, chain) -> identity, raising PeerRejected
Verifier = Callable[[Any, list[Any]], Any]
# accept(connection, identity): the session layer takes the connection over
Acceptor = Callable[[Connection, Any], None]


def server_configuration(
    cert_path: str, key_path: str, *, idle_timeout: float = 60.0, max_datagram_size: int = 1350
) -> QuicConfiguration:
    configuration = QuicConfiguration(
        is_client=False,
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
    ) -> None:
        check_aioquic()
        # per connection: the certificate of the tenant the client's server name names (None:
        # always the configuration's, DIR/controller/)
        self.choose_certificate = choose_certificate
        self.configuration = configuration
        self.verify = verify
        self.accept = accept
        self.max_connections = max_connections
        self.reset_tokens = reset_tokens
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self._by_cid: dict[bytes, Connection] = {}
        self._connections: set[Connection] = set()
        self.counters = {
            "handshakes": 0,
            "refused": 0,
            "accepted": 0,
            "dropped_datagrams": 0,
            "stateless_resets": 0,
        }

    # --- asyncio.DatagramProtocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
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
                or len(self._connections) >= self.max_connections
            ):
                self.counters["dropped_datagrams"] += 1
                return
            conn = self._new_connection(header.destination_cid)
        conn.datagram_received(data, addr)

    def _sendto(self, data: bytes, addr: Any) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    # --- connections ---------------------------------------------------------------------------------
    def _new_connection(self, original_cid: bytes) -> Connection:
        quic = MutualTlsServerConnection(
            configuration=self.configuration,
            original_destination_connection_id=original_cid,
            reset_tokens=self.reset_tokens,
            choose_certificate=self.choose_certificate,
        )
        conn = Connection(quic, Sender.CONTROLLER, self._sendto, self.loop)
        conn.on_handshake = self._handshake_completed
        conn.on_terminated = self._forget
        conn.on_cid_event = self._cid_event
        self._connections.add(conn)
        conn.route_ids.update((quic.host_cid, original_cid))
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
        leaf, chain = peer_certificates(conn.quic)
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
        self._connections.discard(conn)
        for cid in conn.route_ids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        conn.route_ids.clear()

    @property
    def connections(self) -> int:
        return len(self._connections)

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self._connections):
            conn.close(code, reason)


async def start_server(
    host: str,
    port: int,
    configuration: QuicConfiguration,
    verify: Verifier,
    accept: Acceptor,
    *,
    reset_tokens: ResetTokens | None = None,
    choose_certificate: CertificateChooser | None = None,
) -> tuple[asyncio.DatagramTransport, QuicServer]:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    size_buffers(sock)
    sock.bind((host, port))
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: QuicServer(
            configuration,
            verify,
            accept,
            reset_tokens=reset_tokens,
            choose_certificate=choose_certificate,
        ),
        sock=sock,
    )
    return transport, protocol
