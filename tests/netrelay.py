"""A userspace network between an agent and a controller for the carrier tests: one loopback
port that relays UDP to the controller's QUIC port and TCP to its TCP port, like a firewall and
NAT the test controls from its own thread.

- ``block_udp(True)`` drops every datagram both ways (a network that blocks UDP); TCP still
  passes (``block_tcp`` stalls it the same way).
- ``rebind()`` gives every UDP flow a new upstream socket, so the controller sees the agent's
  packets come from a new source port (a NAT rebinding).

It runs an asyncio loop in a thread of its own; the methods are called from the test's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: NetRelay, client: tuple[str, int]) -> None:
        self.relay = relay
        self.client = client

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay._from_target(self.client, data)

    def error_received(self, exc: Exception) -> None:
        pass


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, relay: NetRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay._from_client(addr, data)

    def error_received(self, exc: Exception) -> None:
        pass


class NetRelay:
    def __init__(self, udp_target: tuple[str, int], tcp_target: tuple[str, int] | None) -> None:
        self.udp_target = udp_target
        self.tcp_target = tcp_target
        self.port = 0
        self.udp_blocked = False
        self.tcp_blocked = False
        self.counters = {"udp_forwarded": 0, "udp_dropped": 0, "tcp_connections": 0, "rebinds": 0}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._listener: asyncio.DatagramTransport | None = None
        self._flows: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._unblocked = asyncio.Event()

    # --- control, from the test's thread ----------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def start(self) -> NetRelay:
        self._thread.start()
        self._call(self._open)
        return self

    def block_udp(self, on: bool = True) -> None:
        self._call(lambda: setattr(self, "udp_blocked", on))

    def block_tcp(self, on: bool = True) -> None:
        def flip() -> None:
            self.tcp_blocked = on
            if on:
                self._unblocked.clear()
            else:
                self._unblocked.set()

        self._call(flip)

    def rebind(self) -> list[int]:
        """A new upstream socket (source port) for every UDP flow; returns the new ports."""
        return list(self._call(self._rebind))

    def upstream_ports(self) -> list[int]:
        return list(
            self._call(lambda: [t.get_extra_info("sockname")[1] for t in self._flows.values()])
        )

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._close)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> NetRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- inside the loop -----------------------------------------------------------------------------
    async def _open(self) -> None:
        self._unblocked.set()
        loop = asyncio.get_running_loop()
        for _ in range(20):  # UDP and TCP on one port number: retry if TCP's is taken
            listener, _ = await loop.create_datagram_endpoint(
                lambda: _Listener(self), local_addr=("127.0.0.1", 0)
            )
            port = listener.get_extra_info("sockname")[1]
            if self.tcp_target is None:
                self._listener, self.port = listener, port
                return
            try:
                self._server = await asyncio.start_server(self._tcp, "127.0.0.1", port)
            except OSError:
                listener.close()
                continue
            self._listener, self.port = listener, port
            return
        raise OSError("no port free for both UDP and TCP")

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pumps):
            task.cancel()
        for flow in self._flows.values():
            flow.close()
        self._flows.clear()
        if self._listener is not None:
            self._listener.close()

    async def _new_flow(self, client: tuple[str, int]) -> asyncio.DatagramTransport:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Upstream(self, client), remote_addr=self.udp_target
        )
        return transport

    async def _rebind(self) -> list[int]:
        ports = []
        for client, old in list(self._flows.items()):
            new = await self._new_flow(client)
            self._flows[client] = new
            old.close()
            ports.append(new.get_extra_info("sockname")[1])
        self.counters["rebinds"] += 1
        return ports

    def _from_client(self, client: tuple[str, int], data: bytes) -> None:
        if self.udp_blocked:
            self.counters["udp_dropped"] += 1
            return
        flow = self._flows.get(client)
        if flow is None:
            task = asyncio.ensure_future(self._first_datagram(client, data))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)
            return
        self.counters["udp_forwarded"] += 1
        flow.sendto(data)

    async def _first_datagram(self, client: tuple[str, int], data: bytes) -> None:
        flow = self._flows.get(client)
        if flow is None:
            flow = self._flows[client] = await self._new_flow(client)
        self.counters["udp_forwarded"] += 1
        flow.sendto(data)

    def _from_target(self, client: tuple[str, int], data: bytes) -> None:
        if self.udp_blocked or self._listener is None:
            self.counters["udp_dropped"] += 1
            return
        self.counters["udp_forwarded"] += 1
        self._listener.sendto(data, client)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.tcp_target is not None
        self.counters["tcp_connections"] += 1
        task = asyncio.current_task()
        assert task is not None
        self._pumps.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.tcp_target)
        except OSError:
            writer.close()
            self._pumps.discard(task)
            return
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(OSError, RuntimeError):
                    w.close()
            self._pumps.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await self._unblocked.wait()
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
