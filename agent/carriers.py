"""The agent's two carriers, dialled: QUIC (UDP) and TLS 1.3 over TCP (HTTP/2), the latter
directly or through an HTTP proxy's CONNECT tunnel. ``agent.carrier_policy`` decides which;
``agent.service`` runs sessions over what these return.

Both carriers end in the same check of the controller's certificate: TLS verified its chain
against the device's bundle (its tenant's CA); :func:`controller_identity` checks what the leaf
claims (``spiffe://<tenant>/margo/wfm/<id>``, serverAuth) from the DER the connection hands back,
whichever carrier brought it.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509

from agent.carrier_policy import Carrier
from agent.config import AgentConfig
from agent.controller_list import Target
from margo_stream.errors import PeerRejected
from margo_stream.identity.fleet_manager import check_controller_certificate
from margo_stream.protocol.codes import ErrorCode
from margo_stream.transport.channel_connection import ChannelConnection
from margo_stream.transport.proxy import ProxyConfig, open_tunnel, proxy_for
from margo_stream.transport.qh3_connection import Qh3Configuration
from margo_stream.transport.quic_stack import dial


@dataclass(slots=True)
class Link:
    """One dialled connection that completed its handshake, and how to let it go."""

    conn: ChannelConnection
    carrier: Carrier
    where: str  # host:port dialled, and the proxy when one carried it
    _release: Callable[[], None] = field(default=lambda: None)

    def release(self, reason: str = "agent reconnecting") -> None:
        self.conn.close(ErrorCode.NO_ERROR, reason)
        self._release()


def controller_identity(conn: ChannelConnection, tenant: str) -> str:
    """The SPIFFE ID of the controller's leaf, which must be a fleet manager of ``tenant``;
    ``PeerRejected`` otherwise. The same check for both carriers."""
    der = conn.peer_certificate_der()
    try:
        leaf = x509.load_der_x509_certificate(der) if der else None
    except ValueError as exc:
        raise PeerRejected(f"controller certificate unreadable: {exc}") from None
    return check_controller_certificate(leaf, tenant)


async def dial_quic(
    target: Target, qconf: QuicConfiguration | Qh3Configuration, timeout: float
) -> Link:
    """A QUIC connection to ``target`` through its handshake, on the stack ``qconf`` is for
    (aioquic or qh3: ``margo_stream.transport.quic_stack``); ``TimeoutError`` when none came
    within ``timeout`` seconds (the fallback's cue), ``OSError`` when UDP could not be sent,
    ``ConnectionLost`` when the handshake was refused."""
    conn, transport = await dial(target.address, target.port, qconf)
    link = Link(conn, Carrier.QUIC, target.endpoint, transport.close)
    try:
        with anyio.fail_after(timeout):
            await conn.wait_handshake()
    except BaseException:
        link.release("no handshake")
        raise
    return link


@dataclass(frozen=True, slots=True)
class TcpRoute:
    """Where the TCP carrier goes for one target, and through which proxy."""

    host: str  # dialled directly, or named in CONNECT
    port: int
    proxy: ProxyConfig | None

    def __str__(self) -> str:
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"{where} through proxy {self.proxy}" if self.proxy else where


def tcp_route(config: AgentConfig, target: Target) -> TcpRoute:
    """``--tcp-controller`` (or the target's own host and port), and the proxy that applies.
    Through a proxy the host is named as it was given (the proxy resolves it, and NO_PROXY
    matches names as curl does); directly, the address already resolved for QUIC is used."""
    entry = config.tcp_entry(target.entry)
    if entry is not None:
        host, direct_host, port = entry.host, entry.host, entry.port
    else:
        host, direct_host, port = target.entry.host, target.address, target.port
    proxy = proxy_for(host, port, explicit=config.proxy, environ=os.environ)
    return TcpRoute(host if proxy else direct_host, port, proxy)


async def dial_tcp(
    route: TcpRoute,
    context: ssl.SSLContext,
    *,
    server_name: str,
    timeout: float,
    idle_timeout: float = 60.0,
) -> Link:
    """TLS over TCP to ``route`` through its handshake (``ProxyError``, ``OSError``,
    ``TimeoutError`` or ``ConnectionLost`` when it could not be had)."""
    from margo_stream.transport.tcp_client import connect_tcp  # the TCP carrier: on fallback

    with anyio.fail_after(timeout):
        sock = None
        if route.proxy is not None:
            sock = await open_tunnel(route.proxy, route.host, route.port, timeout=timeout)
        try:
            conn = await connect_tcp(
                route.host,
                route.port,
                context,
                server_name=server_name,
                timeout=timeout,
                sock=sock,
                idle_timeout=idle_timeout,
            )
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        link = Link(conn, Carrier.TCP, str(route))
        try:
            await conn.wait_handshake()
        except BaseException:
            link.release("no handshake")
            raise
    return link


def tcp_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The TCP carrier's TLS context, read per connection (renewal replaces the files)."""
    from margo_stream.transport.tcp_client import client_ssl_context

    return client_ssl_context(cert, key, ca)
