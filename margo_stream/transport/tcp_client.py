"""The agent's side of the TCP carrier: one TLS 1.3 connection speaking HTTP/2 (ALPN ``h2``),
dialled directly or over a socket already connected (an HTTP proxy's CONNECT tunnel)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from margo_stream.protocol.codes import ErrorCode, Sender
from margo_stream.transport.h2_carrier import TcpConnection
from margo_stream.transport.h2_mapping import ALPN_H2


def client_ssl_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """TLS 1.3 only, ALPN ``h2``, the device's certificate, the controller verified against
    ``ca`` (the device's tenant CA) and the server name given to ``connect_tcp``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols([ALPN_H2])
    return ctx


async def connect_tcp(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    server_name: str,
    timeout: float,
    sock: socket.socket | None = None,
    idle_timeout: float = 60.0,
) -> TcpConnection:
    """Connect, complete TLS and see the controller's HTTP/2 SETTINGS within ``timeout``.

    With ``sock`` (already connected, e.g. through a proxy tunnel) ``host`` and ``port`` are
    not dialled. Raises ``OSError`` when TCP fails, ``TimeoutError`` when the whole did not
    complete in time, ``ConnectionLost`` when TLS or the controller refused (its ``code`` is
    ``0x100 + alert`` for a TLS alert, as on QUIC, or the controller's GOAWAY code).
    The caller checks the controller's certificate (``peer_certificate_der()``) before use.
    """
    loop = asyncio.get_running_loop()
    conn = TcpConnection(
        Sender.AGENT, loop, ssl_context, server_name=server_name, idle_timeout=idle_timeout
    )
    try:
        async with asyncio.timeout(timeout):
            if sock is None:
                await loop.create_connection(lambda: conn, host, port)
            else:
                sock.setblocking(False)
                await loop.create_connection(lambda: conn, sock=sock)
            await conn.wait_handshake()
            if conn.closed is not None:
                raise conn.closed
    except BaseException:
        conn.close(ErrorCode.NO_ERROR, "connect abandoned")
        if sock is not None and conn.transport is None:
            sock.close()
        raise
    return conn
