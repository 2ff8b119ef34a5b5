"""A small HTTP/1.1 listener for ``GET /metrics`` (the Prometheus text format), apart from
every other listener, served in the caller's event loop.

The page is rendered on the loop by ``render`` (so it reads the process's state without
locks); a scrape is one request per connection, with a bounded request head and a timeout, so
a slow or hostile client holds one small task and nothing else. Anything but ``GET /metrics``
(or ``HEAD``) is answered 404 or 405. Bound to loopback by default: metrics name tenants and
devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import anyio.abc
import h11
from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger("margo.metrics")

MAX_HEAD = 16 * 1024  # bytes of request line and headers
REQUEST_TIMEOUT = 10.0  # seconds for the whole exchange
MAX_CLIENTS = 32  # scrapes served at once


class MetricsServer:
    def __init__(self, render: Callable[[], bytes]) -> None:
        self.render = render
        self.port: int | None = None
        self._slots = anyio.Semaphore(MAX_CLIENTS)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[MetricsServer] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started(self)
        async with listener:
            await listener.serve(self._client)

    async def _client(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            if self._slots.value == 0:
                return  # too many scrapes at once: close
            async with self._slots:
                with anyio.move_on_after(REQUEST_TIMEOUT):
                    try:
                        await self._exchange(client)
                    except (anyio.BrokenResourceError, anyio.EndOfStream, h11.ProtocolError):
                        pass
                    except OSError as exc:
                        log.debug("metrics client: %s", exc)

    async def _exchange(self, client: anyio.abc.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await client.receive(65536))
                continue
            break
        if not isinstance(event, h11.Request):
            return
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace").split("?", 1)[0]
        if target != "/metrics":
            status, body, ctype = 404, b"not found: try /metrics\n", "text/plain; charset=utf-8"
        elif method not in ("GET", "HEAD"):
            status, body, ctype = 405, b"method not allowed\n", "text/plain; charset=utf-8"
        else:
            status, body, ctype = 200, self.render(), CONTENT_TYPE_LATEST
        headers = [
            ("Content-Type", ctype),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if method != "HEAD":
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await client.send(out)


__all__ = ["MetricsServer"]
