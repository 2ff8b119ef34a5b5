"""The operator's side of the push figures: one kept-alive HTTP/1.1 connection to the API,
requests written and responses read with h11 over asyncio streams.

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


class OperatorClient:
    """``await post_json(path, body)`` over one connection, opened on first use."""

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
        self._conn: h11.Connection | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used = 0.0  # loop time of the last answer

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._conn = h11.Connection(h11.CLIENT)

    async def post_json(self, path: str, body: Any) -> Any:
        """POST ``body`` as JSON; the decoded JSON answer (``OperatorHttpError`` unless 2xx)."""
        data = json.dumps(body).encode()
        loop = asyncio.get_running_loop()
        if (
            self._conn is None
            or self._conn.our_state is not h11.IDLE
            or self._reader is None
            or self._reader.at_eof()
            or loop.time() - self._used > IDLE_REUSE_S
        ):
            await self.close()
            await self._connect()
        conn, reader, writer = self._conn, self._reader, self._writer
        assert conn is not None and reader is not None and writer is not None
        headers = [*self._headers, ("Content-Length", str(len(data)))]
        writer.write(
            conn.send(h11.Request(method="POST", target=path, headers=headers))
            + (conn.send(h11.Data(data=data)) or b"")
            + (conn.send(h11.EndOfMessage()) or b"")
        )
        status, chunks, size = 0, [], 0
        async with asyncio.timeout(self.timeout):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    received = await reader.read(65536)
                    if not received:
                        raise OperatorHttpError(f"the API at {self.host}:{self.port} hung up")
                    conn.receive_data(received)
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
        conn.start_next_cycle()
        self._used = loop.time()
        text = b"".join(chunks)
        if not 200 <= status < 300:
            raise OperatorHttpError(f"POST {path}: HTTP {status}: {text[:500]!r}")
        return json.loads(text)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._conn = self._reader = self._writer = None


__all__ = ["OperatorClient", "OperatorHttpError"]
