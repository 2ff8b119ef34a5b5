"""The controller's TCP listener for the TCP carrier (HTTP/2 over mutual TLS 1.3).

Each accepted socket becomes a ``TcpConnection``. The moment its TLS handshake completes, the
client's leaf certificate goes to ``verify`` (the controller's admission: the chain against the
tenant's bundle, then the tenant's allow-list, the same check the QUIC listener makes); a
refusal closes the connection with GOAWAY(IDENTITY_REFUSED, reason) before a single request is
read, and is logged. An admitted connection goes to ``accept`` (a controller session).

Bounds: a connection whose TLS handshake and identity check are not done within
``handshake_timeout`` is dropped; at most ``max_half_open`` handshakes are in progress at once
(more are closed at once) and at most ``max_connections`` connections live. Failed handshakes
(no certificate, a certificate of no tenant, garbage instead of TLS) are logged one line each,
at most ``LOG_BURST`` per ``LOG_EVERY`` seconds, the rest counted (``counters``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from margo_stream.errors import PeerRejected
from margo_stream.protocol.codes import ErrorCode, Sender
from margo_stream.transport.channel_connection import ChannelConnection
from margo_stream.transport.h2_carrier import TcpConnection
from margo_stream.transport.h2_mapping import describe_remote

log = logging.getLogger("margo.transport.tcp")

# verify(DER leaf or None) -> identity, raising PeerRejected
Verify = Callable[[bytes | None], Any]
# accept(connection, identity): the session layer takes the connection over
Accept = Callable[[ChannelConnection, Any], None]

LOG_EVERY = 10.0
LOG_BURST = 10


class _Drop(asyncio.Protocol):
    """Over the caps: close the socket at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class TcpServer:
    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        verify: Verify,
        accept: Accept,
        *,
        handshake_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        max_connections: int = 50_000,
        max_half_open: int = 2048,
    ) -> None:
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be > 0 seconds")
        self.ssl_context = ssl_context  # new connections use this one (swapped by a reload)
        self.verify = verify
        self.accept = accept
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_half_open = max_half_open
        self.loop = asyncio.get_running_loop()
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self._connections: set[TcpConnection] = set()
        self._half_open: dict[TcpConnection, asyncio.TimerHandle] = {}
        self._log_window = (0.0, 0)  # (start, lines logged in it)
        self.counters = {
            "accepted": 0,
            "refused": 0,  # identity refused after TLS
            "tls_failed": 0,  # handshake failed (no or bad certificate, not TLS)
            "handshake_timeouts": 0,
            "dropped": 0,  # over max_half_open or max_connections
        }

    # --- connections -----------------------------------------------------------------------------
    def _new(self) -> asyncio.Protocol:
        if len(self._half_open) >= self.max_half_open or (
            len(self._connections) >= self.max_connections
        ):
            self.counters["dropped"] += 1
            return _Drop()
        conn = TcpConnection(
            Sender.CONTROLLER, self.loop, self.ssl_context, idle_timeout=self.idle_timeout
        )
        conn.on_established = self._established
        conn.on_terminated = self._forget
        self._connections.add(conn)
        self._half_open[conn] = self.loop.call_later(
            self.handshake_timeout, self._handshake_expired, conn
        )
        return conn

    def _established(self, conn: TcpConnection) -> None:
        """TLS completed: admit the client's certificate or refuse the connection."""
        timer = self._half_open.pop(conn, None)
        if timer is not None:
            timer.cancel()
        try:
            identity = self.verify(conn.peer_certificate_der())
        except PeerRejected as exc:
            self.counters["refused"] += 1
            remote = describe_remote(conn.remote)
            log.warning(
                "refused TCP connection from %s: %s",
                remote,
                exc.reason,
                extra={"event": "peer-refused", "remote": remote, "reason": exc.reason},
            )
            conn.close(ErrorCode.IDENTITY_REFUSED, exc.reason)
            return
        self.counters["accepted"] += 1
        self.accept(conn, identity)

    def _handshake_expired(self, conn: TcpConnection) -> None:
        if self._half_open.pop(conn, None) is None:
            return
        self.counters["handshake_timeouts"] += 1
        self._log_failure(conn, f"handshake not completed within {self.handshake_timeout:g} s")
        conn.close(ErrorCode.HELLO_TIMEOUT, "handshake not completed in time")

    def _forget(self, conn: TcpConnection) -> None:
        timer = self._half_open.pop(conn, None)
        if timer is not None:
            timer.cancel()
            closed = conn.closed
            if closed is not None and closed.code != ErrorCode.SHUTTING_DOWN:
                # TLS failed (or was not h2): nothing was read
                self.counters["tls_failed"] += 1
                self._log_failure(conn, closed.reason)
        self._connections.discard(conn)

    def _log_failure(self, conn: TcpConnection, reason: str) -> None:
        now = self.loop.time()
        start, lines = self._log_window
        if now - start >= LOG_EVERY:
            if lines > LOG_BURST:
                log.warning(
                    "%d more TCP handshakes failed in the last %.0f s",
                    lines - LOG_BURST,
                    now - start,
                    extra={"event": "tcp-handshake-failed", "count": lines - LOG_BURST},
                )
            start, lines = now, 0
        lines += 1
        self._log_window = (start, lines)
        if lines <= LOG_BURST:
            remote = describe_remote(conn.remote)
            log.warning(
                "TCP handshake with %s failed: %s",
                remote,
                reason,
                extra={"event": "tcp-handshake-failed", "remote": remote, "reason": reason},
            )

    # --- the listener ------------------------------------------------------------------------------
    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def half_open_now(self) -> int:
        """Handshakes in progress (TLS or the identity check not yet done)."""
        return len(self._half_open)

    def close_all(self, code: int, reason: str) -> None:
        """Close every connection (GOAWAY with ``code``) and stop accepting."""
        if self.server is not None:
            self.server.close()
        for conn in list(self._connections):
            conn.close(code, reason)

    async def aclose(self) -> None:
        self.close_all(ErrorCode.SHUTTING_DOWN, "controller shutting down")
        if self.server is not None:
            await self.server.wait_closed()


async def start_tcp_server(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    verify: Verify,
    accept: Accept,
    *,
    handshake_timeout: float = 5.0,
    idle_timeout: float = 60.0,
    reuse_port: bool = False,
    max_connections: int = 50_000,
    max_half_open: int = 2048,
) -> TcpServer:
    """Listen on ``host:port`` (``OSError`` when the address is taken); with ``reuse_port`` the
    socket joins an SO_REUSEPORT group (``margo-controller --workers``)."""
    loop = asyncio.get_running_loop()
    server = TcpServer(
        ssl_context,
        verify,
        accept,
        handshake_timeout=handshake_timeout,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        max_half_open=max_half_open,
    )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    server.server = await loop.create_server(server._new, sock=sock)
    server.port = sock.getsockname()[1]
    return server
