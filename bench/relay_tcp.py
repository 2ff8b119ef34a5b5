"""Userspace TCP impairment relay (the kernel here has no netem).

Theory of operation
-------------------
For every accepted client connection the relay opens one connection to the target and pumps
bytes both ways. Each direction is a reader task and a writer task joined by a bounded memory
object stream (backpressure: when the writer falls behind, the reader stops reading and the
sender's kernel buffers fill, as on a slow link). The reader stamps every chunk it reads (one
``receive()``, up to ``chunk_size`` bytes) with a due time; the writer writes it at that time.

Delay and jitter: a chunk is due ``delay +- jitter`` after it was read, but never before the
previous chunk of the same direction, so order is preserved as TCP preserves it.

Handshake: with ``emulate_handshake`` (the default) the first bytes of a connection also pay for
the SYN / SYN-ACK round trip the relay's local accept skipped: client bytes reach the target
no earlier than ``2 x up + down`` after the accept, target bytes reach the client no earlier
than ``2 x (up + down)``. So TCP-based transports pay the same connection set-up cost through
the relay as QUIC pays through the UDP relay.

Loss: TCP cannot lose bytes, so userspace must not drop any. Instead the relay emulates what
TCP does about a lost segment: it is retransmitted after a retransmission timeout (RTO), and
everything sent after it waits behind it at the receiver (head-of-line blocking). A chunk is
treated as ``ceil(len / mss)`` segments; it suffers a loss with probability
``1 - (1 - loss) ** segments`` (for a chunk of one segment: ``loss``). A lost chunk is delayed
by the RTO (``Impairment.rto_ms``, default ``max(200 ms, 2 x RTT)``, RTT being twice the
one-way delay of that direction); if the retransmission is lost too (again with probability
``loss``) the RTO doubles, as TCP's exponential backoff does (at most 6 times). Because every
later chunk is due no earlier than the delayed one, the penalty also blocks the rest of the
connection. This is the pessimistic, tail-loss case of TCP recovery; to model fast retransmit
(about one RTT) instead, set ``rto_ms`` to the RTT. Counters: ``dropped_loss`` counts emulated
segment losses and ``rto_penalty_s`` the time they cost; no byte is ever dropped.

Blackhole: while on, nothing moves in either direction, but connections stay open, so both
peers see a stall exactly like a dead link; when it is switched off everything queued is
delivered, as TCP retransmission would deliver it. ``reset_all()`` instead closes every
connection with a reset. ``reorder`` has no meaning for TCP and is ignored.

Every task lives in the relay's task group: ``async with`` cancels them all and closes every
socket on exit.
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
from dataclasses import dataclass

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from .impairment import (
    Direction,
    DirectionStats,
    Impairment,
    LinkRandom,
    RelayProperties,
    effective_seed,
)

__all__ = ["TcpRelay", "TcpRelayStats"]

_UP = Direction.UPSTREAM
_DOWN = Direction.DOWNSTREAM
_MAX_BACKOFF = 6
_IO_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)


@dataclass(frozen=True, slots=True)
class TcpRelayStats:
    """A snapshot of a :class:`TcpRelay`'s counters."""

    upstream: DirectionStats
    downstream: DirectionStats
    connections_active: int
    connections_total: int
    connections_refused: int
    connect_failures: int
    connections_reset: int
    seed: int
    blackholed: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "upstream": self.upstream.to_dict(),
            "downstream": self.downstream.to_dict(),
            "connections_active": self.connections_active,
            "connections_total": self.connections_total,
            "connections_refused": self.connections_refused,
            "connect_failures": self.connect_failures,
            "connections_reset": self.connections_reset,
            "seed": self.seed,
            "blackholed": self.blackholed,
        }


class _Conn:
    """One relayed connection: both sockets and, per direction, the earliest next due time."""

    __slots__ = ("client", "upstream", "scope", "last_due")

    def __init__(self, client: SocketStream) -> None:
        self.client = client
        self.upstream: SocketStream | None = None
        self.scope: anyio.CancelScope | None = None
        self.last_due = [0.0, 0.0]  # per direction: no chunk is due before this


def _abort(stream: SocketStream | None) -> None:
    """Make the coming close send a reset instead of a FIN."""
    if stream is None:
        return
    with contextlib.suppress(Exception):
        raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class TcpRelay(RelayProperties):
    """Forward TCP connections to ``target`` through an impaired link.

    ``async with TcpRelay(target=("127.0.0.1", port), impairment=Impairment(delay_ms=50)) as r:``
    listens on ``listen`` (``r.port`` / ``r.address`` tell where) until the block ends.
    """

    def __init__(
        self,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        target: tuple[str, int] | None = None,
        impairment: Impairment | None = None,
        *,
        emulate_handshake: bool = True,
        mss: int = 1448,
        chunk_size: int = 65_536,
        max_buffered_chunks: int = 64,
        max_connections: int = 16_384,
        connect_timeout: float = 10.0,
    ) -> None:
        if target is None:
            raise TypeError("TcpRelay needs a target=(host, port)")
        if mss < 1 or chunk_size < 1 or max_buffered_chunks < 1 or max_connections < 1:
            raise ValueError("mss, chunk_size, max_buffered_chunks, max_connections must be > 0")
        self._listen = listen
        self._target = target
        self._impairment = impairment if impairment is not None else Impairment()
        self._emulate_handshake = emulate_handshake
        self._mss = mss
        self._chunk_size = chunk_size
        self._max_buffered = max_buffered_chunks
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._seed = effective_seed(self._impairment.seed)
        self._rand = (LinkRandom(self._seed, _UP), LinkRandom(self._seed, _DOWN))
        self._stats = (DirectionStats(), DirectionStats())
        self._blackholed = self._impairment.blackhole
        self._link_up = anyio.Event()
        if not self._blackholed:
            self._link_up.set()
        self._conns: set[_Conn] = set()
        self._connections_total = 0
        self._connections_refused = 0
        self._connect_failures = 0
        self._connections_reset = 0
        self._address: tuple[str, int] | None = None
        self._tg: TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> TcpRelay:
        async with contextlib.AsyncExitStack() as stack:
            listener = await anyio.create_tcp_listener(
                local_host=self._listen[0], local_port=self._listen[1], reuse_port=False
            )
            await stack.enter_async_context(listener)
            address = listener.extra(SocketAttribute.local_address)
            assert isinstance(address, tuple)  # a TCP listener's (host, port), not a UNIX path
            host, port = address[:2]
            self._address = (str(host), int(port))
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)  # runs before the task group exits
            tg.start_soon(listener.serve, self._handle, tg)
            self._tg = tg
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> bool | None:
        stack, self._stack = self._stack, None
        self._tg = None
        if stack is None:
            return None
        try:
            return await stack.__aexit__(*exc_info)  # type: ignore[arg-type]
        finally:
            self._address = None

    # ----------------------------------------------------------------- public API

    def set_impairment(self, impairment: Impairment) -> None:
        """Change the settings while running (applies to chunks read from now on)."""
        if impairment.seed is not None and impairment.seed != self._seed:
            self._seed = impairment.seed
            self._rand = (LinkRandom(self._seed, _UP), LinkRandom(self._seed, _DOWN))
        self._impairment = impairment

    def blackhole(self, on: bool = True) -> None:
        """While on, stall both directions of every connection (connections stay open)."""
        on = bool(on)
        if on == self._blackholed:
            return
        self._blackholed = on
        if on:
            self._link_up = anyio.Event()
        else:
            self._link_up.set()

    async def blackhole_for(self, seconds: float) -> None:
        """Blackhole the link for ``seconds``, then restore it (also if cancelled)."""
        self.blackhole(True)
        try:
            await anyio.sleep(seconds)
        finally:
            self.blackhole(False)

    def reset_all(self) -> int:
        """Close every relayed connection with a reset on both sides; returns how many."""
        conns = list(self._conns)
        for conn in conns:
            self._reset(conn)
        return len(conns)

    def stats(self) -> TcpRelayStats:
        return TcpRelayStats(
            upstream=self._stats[0].copy(),
            downstream=self._stats[1].copy(),
            connections_active=len(self._conns),
            connections_total=self._connections_total,
            connections_refused=self._connections_refused,
            connect_failures=self._connect_failures,
            connections_reset=self._connections_reset,
            seed=self._seed,
            blackholed=self._blackholed,
        )

    # ----------------------------------------------------------------- connections

    def _reset(self, conn: _Conn) -> None:
        _abort(conn.client)
        _abort(conn.upstream)
        self._connections_reset += 1
        if conn.scope is not None:
            conn.scope.cancel()

    async def _handle(self, client: SocketStream) -> None:
        if len(self._conns) >= self._max_connections:
            self._connections_refused += 1
            _abort(client)
            await client.aclose()
            return
        conn = _Conn(client)
        self._connections_total += 1
        self._conns.add(conn)
        accepted = anyio.current_time()
        try:
            async with client, anyio.create_task_group() as tg:
                conn.scope = tg.cancel_scope
                try:
                    with anyio.fail_after(self._connect_timeout):
                        conn.upstream = await anyio.connect_tcp(*self._target)
                except (OSError, TimeoutError):
                    self._connect_failures += 1
                    _abort(client)
                    return
                async with conn.upstream:
                    if self._emulate_handshake:
                        up = self._impairment.link(_UP).delay_ms / 1000.0
                        down = self._impairment.link(_DOWN).delay_ms / 1000.0
                        conn.last_due = [accepted + 2 * up + down, accepted + 2 * (up + down)]
                    tg.start_soon(self._pump, conn, _UP, client, conn.upstream)
                    await self._pump(conn, _DOWN, conn.upstream, client)
        finally:
            self._conns.discard(conn)

    async def _pump(
        self, conn: _Conn, direction: Direction, src: SocketStream, dst: SocketStream
    ) -> None:
        """Read ``src``, stamp each chunk with its due time, hand it to the writer."""
        index = 0 if direction is _UP else 1
        stats = self._stats[index]
        send, receive = anyio.create_memory_object_stream[tuple[float, bytes]](self._max_buffered)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer, conn, stats, receive, dst)
                async with send:
                    while True:
                        if self._blackholed:
                            stats.dropped_blackhole += 1
                            while self._blackholed:
                                await self._link_up.wait()
                        try:
                            data = await src.receive(self._chunk_size)
                        except anyio.EndOfStream:
                            break
                        await send.send((self._due(conn, index, direction, len(data)), data))
        except* _IO_ERRORS:
            # One side failed (reset, closed): the other side sees a reset too.
            _abort(conn.client)
            _abort(conn.upstream)
            if conn.scope is not None:
                conn.scope.cancel()

    def _due(self, conn: _Conn, index: int, direction: Direction, size: int) -> float:
        imp = self._impairment
        link = imp.link(direction)
        rand = self._rand[index]
        due = max(anyio.current_time() + rand.delay_s(link), conn.last_due[index])
        if link.loss > 0.0:
            segments = max(1, math.ceil(size / self._mss))
            p_chunk = 1.0 - (1.0 - link.loss) ** segments
            if rand.loss.random() < p_chunk:
                stats = self._stats[index]
                rto = imp.rto_s(direction)
                penalty = rto
                losses = 1
                # The retransmission itself may be lost: exponential backoff.
                while losses < _MAX_BACKOFF and rand.loss.random() < link.loss:
                    penalty += rto * (2**losses)
                    losses += 1
                stats.dropped_loss += losses
                stats.rto_penalty_s += penalty
                due += penalty
        conn.last_due[index] = due
        return due

    async def _writer(
        self,
        conn: _Conn,
        stats: DirectionStats,
        receive: MemoryObjectReceiveStream[tuple[float, bytes]],
        dst: SocketStream,
    ) -> None:
        async with receive:
            async for due, data in receive:
                wait = due - anyio.current_time()
                if wait > 0:
                    await anyio.sleep(wait)
                if self._blackholed:
                    stats.dropped_blackhole += 1
                    while self._blackholed:
                        await self._link_up.wait()
                await dst.send(data)
                stats.forwarded += 1
                stats.bytes_forwarded += len(data)
        # The source sent EOF and everything before it was delivered: pass the EOF on.
        with contextlib.suppress(*_IO_ERRORS):
            await dst.send_eof()
