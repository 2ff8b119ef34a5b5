"""The operator's side of the push figures: kept-alive HTTP/1.1 connections to the API (one per
request in flight), requests written and responses read with h11 over asyncio streams.

httpx (margoctl's client) spends about a millisecond of Python per request before its bytes
reach the socket and after the answer arrived (1.43 ms round trip against 0.29 ms for the same
POST written by hand, on this machine): a tenth of the 10 ms push target, spent in the bench
itself. The apply figures time the control plane from the moment the request is written, so
the bench writes it with as little in between as h11 allows. Plain HTTP only (the bench's API
listens on loopback without TLS).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import h11

MAX_RESPONSE = 16 << 20
IDLE_REUSE_S = 4.0  # uvicorn closes a connection idle for 5 s: a new one after 4


class OperatorHttpError(Exception):
    """The API answered with an error status, or the connection broke."""


class _Connection:
    """One kept-alive HTTP/1.1 connection (one request at a time)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.used = asyncio.get_running_loop().time()

    def reusable(self, now: float) -> bool:
        return (
            self.h11.our_state is h11.IDLE
            and not self.reader.at_eof()
            and now - self.used <= IDLE_REUSE_S
        )

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


class OperatorClient:
    """``await post_json(path, body)``; requests made at once each get a connection of their
    own (kept for the next ones), as a browser or httpx's pool would."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 120.0) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"the bench's operator client speaks plain HTTP, not {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.timeout = timeout
        self._headers = [
            ("Host", f"{self.host}:{self.port}"),
            ("Authorization", f"Bearer {token}"),
            ("Content-Type", "application/json"),
        ]
        self._idle: list[_Connection] = []

    async def _take(self) -> _Connection:
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable(now):
                return conn
            await conn.close()
        return _Connection(*await asyncio.open_connection(self.host, self.port))

    async def post_json(self, path: str, body: Any) -> Any:
        """POST ``body`` as JSON; the decoded JSON answer (``OperatorHttpError`` unless 2xx)."""
        data = json.dumps(body).encode()
        conn = await self._take()
        try:
            status, text = await self._exchange(conn, path, data)
        except BaseException:
            await conn.close()
            raise
        self._idle.append(conn)
        if not 200 <= status < 300:
            raise OperatorHttpError(f"POST {path}: HTTP {status}: {text[:500]!r}")
        return json.loads(text)

    async def _exchange(self, conn: _Connection, path: str, data: bytes) -> tuple[int, bytes]:
        h = conn.h11
        headers = [*self._headers, ("Content-Length", str(len(data)))]
        conn.writer.write(
            h.send(h11.Request(method="POST", target=path, headers=headers))
            + (h.send(h11.Data(data=data)) or b"")
            + (h.send(h11.EndOfMessage()) or b"")
        )
        status, chunks, size = 0, [], 0
        async with asyncio.timeout(self.timeout):
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    received = await conn.reader.read(65536)
                    if not received:
                        raise OperatorHttpError(f"the API at {self.host}:{self.port} hung up")
                    h.receive_data(received)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_RESPONSE:
                        raise OperatorHttpError(f"answer to POST {path} over {MAX_RESPONSE} bytes")
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise OperatorHttpError(f"the API at {self.host}:{self.port} closed")
        h.start_next_cycle()
        conn.used = asyncio.get_running_loop().time()
        return status, b"".join(chunks)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


__all__ = ["OperatorClient", "OperatorHttpError"]
