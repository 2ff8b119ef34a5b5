"""The agent's TCP carrier behind the bench's ``TransportClient`` interface: the same protocol,
sessions and desired-state handling as :class:`bench.transports.quic.QuicClient` (it is one,
with another ``connect``), carried by TLS 1.3 on TCP with one HTTP/2 stream per channel stream,
as the real agent falls back to when UDP is blocked: ``margo_stream.transport.tcp_client``'s
``client_ssl_context`` and ``connect_tcp``, the controller's ``--tcp-listen``.

Byte counters come from the kernel (``TCP_INFO``: bytes acknowledged by the peer and bytes
received, TLS records and HTTP/2 framing included, TCP/IP headers not, as for the other TCP
transports), refreshed every second and at the close.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import anyio

from agent.session import AgentSession
from bench.transports.quic import QuicClient, QuicError

_TCP_INFO_LEN = 232
_BYTES_AT = 120  # struct tcp_info: tcpi_bytes_acked (u64), then tcpi_bytes_received (u64)


def tcp_bytes(sock: socket.socket) -> tuple[int, int] | None:
    """(bytes sent and acknowledged, bytes received) of ``sock``, from Linux's TCP_INFO."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < _BYTES_AT + 16:
        return None
    sent, received = struct.unpack_from("<QQ", info, _BYTES_AT)
    return int(sent), int(received)


class TcpCarrierClient(QuicClient):
    name = "tcp"

    def __init__(
        self,
        identity_dir: Path,
        host: str,
        port: int,
        *,
        state_dir: Path,
        server_name: str | None = None,
        connect_timeout: float = 20.0,
        keepalive: float | None = None,
    ) -> None:
        super().__init__(
            identity_dir,
            host,
            port,
            state_dir=state_dir,
            server_name=server_name,
            connect_timeout=connect_timeout,
            keepalive=keepalive,
        )
        self.server_name = server_name or self.tenant
        self._sock: socket.socket | None = None

    def _count(self) -> None:
        if self._sock is not None and (got := tcp_bytes(self._sock)) is not None:
            self.counters.bytes_sent, self.counters.bytes_received = got

    async def _counting(self) -> None:
        while True:
            await anyio.sleep(1.0)
            self._count()

    async def connect(self) -> None:
        from margo_stream.transport.tcp_client import client_ssl_context, connect_tcp

        creds = self.creds
        context = client_ssl_context(str(creds.cert_path), str(creds.key_path), str(creds.ca_path))
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = self._sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            with anyio.fail_after(self.config.connect_timeout):
                await loop.sock_connect(sock, (self.host, self.port))
                conn = await connect_tcp(
                    self.host,
                    self.port,
                    context,
                    server_name=self.server_name,
                    timeout=self.config.connect_timeout,
                    sock=sock,
                )
                self.conn = conn  # type: ignore[assignment]
                await conn.wait_handshake()
                self.session = AgentSession(self, conn)  # type: ignore[arg-type]
                self._tg.start_soon(self._run_session)
                self._tg.start_soon(self._counting)
                await self._ready.wait()
                if self.last_error is not None:
                    raise QuicError(f"session ended: {self.last_error}")
                await self._status_ready.wait()
        except BaseException:
            await self.close()
            raise
        self.counters.requests += 1  # the hello

    async def close(self) -> None:
        self._count()
        if self.conn is not None:
            self.conn.close()
        if self._tg is not None:
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._updates_in.close()


__all__ = ["TcpCarrierClient", "tcp_bytes"]
