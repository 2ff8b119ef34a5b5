"""The agent's side of the wire: one UDP socket and one mutual-TLS QUIC connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from margo_stream.errors import ConfigError
from margo_stream.identity.fleet_manager import check_controller_certificate
from margo_stream.protocol.codes import ALPN, Sender
from margo_stream.transport.congestion import DEFAULT_CONGESTION_CONTROL
from margo_stream.transport.connection import Connection
from margo_stream.transport.mtls_hook import (
    bound_receive_credit,
    peer_certificates,
)


def client_configuration(
    cert_path: str,
    key_path: str,
    ca_path: str,
    *,
    server_name: str,
    idle_timeout: float = 60.0,
    max_datagram_size: int = 1350,
    congestion_control: str = DEFAULT_CONGESTION_CONTROL,
) -> QuicConfiguration:
    configuration = QuicConfiguration(
        is_client=True,
        congestion_control_algorithm=congestion_control,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        server_name=server_name,
        max_datagram_size=max_datagram_size,
        max_data=4 << 20,
        max_stream_data=1 << 20,
    )
    configuration.load_cert_chain(cert_path, key_path)
    configuration.load_verify_locations(cafile=ca_path)
    return configuration


def controller_identity(conn: Connection, tenant: str) -> str:
    """After the handshake: the SPIFFE ID of the controller's leaf, which must be a fleet
    manager of ``tenant`` (``spiffe://<tenant>/margo/wfm/<id>``, serverAuth); ``PeerRejected``
    otherwise. TLS already verified the chain against the device's bundle, its tenant's CA."""
    leaf, _ = peer_certificates(conn.quic)
    return check_controller_certificate(leaf, tenant)


def parse_host_port(text: str, *, what: str = "address") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port), with a clear error."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT")
    host = host.strip("[]")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ConfigError(f"{what} {text!r}: port {number} is out of range")
    return host, number


class _Receiver(Protocol):
    def datagram_received(self, data: bytes, addr: Any) -> None: ...


R = TypeVar("R", bound=_Receiver)


class _ClientProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.connection: _Receiver | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.connection is not None:
            self.connection.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable and the like
        pass


async def dial_udp(
    host: str,
    port: int,
    make: Callable[[asyncio.DatagramTransport, Any], R],
) -> tuple[R, asyncio.DatagramTransport]:
    """A UDP socket towards ``host:port`` (resolved here) and the connection ``make(transport,
    address)`` builds on it, fed every datagram the socket receives; either QUIC stack."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise ConfigError(f"cannot resolve {host!r}")
    family, _, _, _, addr = infos[0]
    local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
    if addr[0] in ("127.0.0.1", "::1"):
        local = (addr[0], 0)
    transport, protocol = await loop.create_datagram_endpoint(_ClientProtocol, local_addr=local)
    conn = make(transport, addr)
    protocol.connection = conn
    return conn, transport


async def connect(
    host: str, port: int, configuration: QuicConfiguration
) -> tuple[Connection, asyncio.DatagramTransport]:
    """Start a handshake; the caller awaits ``connection.wait_handshake()`` with a timeout and
    closes the returned transport when done with the connection."""
    loop = asyncio.get_running_loop()

    def make(transport: asyncio.DatagramTransport, addr: Any) -> Connection:
        quic = QuicConnection(configuration=configuration)
        bound_receive_credit(quic)  # a hostile controller cannot grow our receive buffers either
        conn = Connection(quic, Sender.AGENT, transport.sendto, loop)
        quic.connect(addr, now=loop.time())
        conn.transmit()
        return conn

    return await dial_udp(host, port, make)
