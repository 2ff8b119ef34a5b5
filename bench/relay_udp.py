"""Userspace UDP impairment relay (the kernel here has no netem).

Theory of operation
-------------------
The relay listens on one UDP socket. Like a NAT, it gives every client address its own
*flow*: a non-blocking UDP socket connected to the target, so the target sees one distinct
source port per client and its replies find their way back. Thousands of clients (simulated
agents) can share one relay; flows idle for ``idle_timeout`` seconds are closed.

Each datagram, in each direction, goes through: blackhole check -> loss draw -> delay draw
(``delay +- jitter``) -> optional reorder hold -> the direction's delay queue -> send. The delay
queue is a heap ordered by due time, served by a single event-loop timer (``call_at``) per
direction: no task and no sleep per datagram. With no delay configured and nothing queued a
datagram is sent at once.

Jitter does not reorder a flow: a datagram is never due before the previous datagram of the
same flow and direction, so ``reorder`` is the only source of reordering and its counter is
exact. A datagram chosen for reordering is held back until ``reorder_gap`` later datagrams of
its flow have been queued (they overtake it), or until ``reorder_hold_ms`` has passed.

While the blackhole is on, every datagram is dropped both ways, including datagrams already
in the delay queue when it turned on (they were "on the wire" of a link that died).

The delay queue of each direction is bounded (``max_queued`` datagrams and
``max_queued_bytes``); arrivals beyond it are dropped and counted as ``dropped_overflow``.

The relay runs on the asyncio event loop (plain asyncio or uvloop, directly or as anyio's
asyncio backend): readers and timers are registered with the loop, and ``async with`` removes
every one of them and closes every socket on exit.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import socket
from dataclasses import dataclass, field

import anyio

from .impairment import (
    Direction,
    DirectionStats,
    Impairment,
    LinkRandom,
    RelayProperties,
    effective_seed,
)

__all__ = ["UdpRelay", "UdpRelayStats"]

_UP = Direction.UPSTREAM
_DOWN = Direction.DOWNSTREAM
_MAX_DATAGRAM = 65_535
_READ_BATCH = 256  # datagrams read per readiness callback before yielding to the loop
_EARLY_S = 0.0002  # send entries due within this much of now in the same timer callback


@dataclass(frozen=True, slots=True)
class UdpRelayStats:
    """A snapshot of a :class:`UdpRelay`'s counters."""

    upstream: DirectionStats
    downstream: DirectionStats
    flows_active: int
    flows_created: int
    flows_expired: int
    flows_refused: int
    seed: int
    blackholed: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "upstream": self.upstream.to_dict(),
            "downstream": self.downstream.to_dict(),
            "flows_active": self.flows_active,
            "flows_created": self.flows_created,
            "flows_expired": self.flows_expired,
            "flows_refused": self.flows_refused,
            "seed": self.seed,
            "blackholed": self.blackholed,
        }


class _Lane:
    """Per flow, per direction: ordering state and the reorder hold slot."""

    __slots__ = ("last_due", "held", "held_due", "held_overtaken", "held_token")

    def __init__(self) -> None:
        self.last_due = 0.0
        self.held: bytes | None = None
        self.held_token = -1
        self.held_due = 0.0
        self.held_overtaken = 0


class _Flow:
    """One client address and its upstream socket."""

    __slots__ = ("client", "sock", "fd", "lanes", "last_active", "pending", "closed")

    def __init__(self, client: tuple[str, int], sock: socket.socket, now: float) -> None:
        self.client = client
        self.sock = sock
        self.fd = sock.fileno()
        self.lanes = (_Lane(), _Lane())
        self.last_active = now
        self.pending = 0  # datagrams of this flow in a delay queue or a hold slot
        self.closed = False


# Heap entry: (due, sequence, flow, payload or None for "release the held datagram").
_Entry = tuple[float, int, _Flow, bytes | None]


@dataclass(slots=True)
class _Path:
    """One direction of the relay: settings, randomness, delay queue and counters."""

    direction: Direction
    rand: LinkRandom
    stats: DirectionStats = field(default_factory=DirectionStats)
    heap: list[_Entry] = field(default_factory=list)
    queued_bytes: int = 0
    timer: asyncio.TimerHandle | None = None
    timer_due: float = 0.0


class UdpRelay(RelayProperties):
    """Forward UDP datagrams between clients and ``target`` through an impaired link.

    ``async with UdpRelay(target=("127.0.0.1", port), impairment=Impairment(loss=0.1)) as r:``
    binds ``listen`` (``r.port`` / ``r.address`` tell where) and forwards until the block ends.
    """

    def __init__(
        self,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        target: tuple[str, int] | None = None,
        impairment: Impairment | None = None,
        *,
        idle_timeout: float = 60.0,
        max_flows: int = 16_384,
        max_queued: int = 65_536,
        max_queued_bytes: int = 32 * 1024 * 1024,
        socket_buffer: int = 4 * 1024 * 1024,
    ) -> None:
        if target is None:
            raise TypeError("UdpRelay needs a target=(host, port)")
        if idle_timeout <= 0 or max_flows < 1 or max_queued < 1 or max_queued_bytes < 1:
            raise ValueError("idle_timeout, max_flows, max_queued and max_queued_bytes must be > 0")
        self._listen = listen
        self._target = target
        self._impairment = impairment if impairment is not None else Impairment()
        self._idle_timeout = idle_timeout
        self._max_flows = max_flows
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes
        self._socket_buffer = socket_buffer
        self._seed = effective_seed(self._impairment.seed)
        self._paths = (
            _Path(_UP, LinkRandom(self._seed, _UP)),
            _Path(_DOWN, LinkRandom(self._seed, _DOWN)),
        )
        self._blackholed = self._impairment.blackhole
        self._flows: dict[tuple[str, int], _Flow] = {}
        self._flows_created = 0
        self._flows_expired = 0
        self._flows_refused = 0
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._expiry: asyncio.TimerHandle | None = None

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> UdpRelay:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("UdpRelay runs on asyncio (anyio's asyncio backend)") from None
        family = socket.AF_INET6 if ":" in self._listen[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            self._tune(sock)
            sock.bind(self._listen)
            self._address = sock.getsockname()[:2]
            self._loop.add_reader(sock.fileno(), self._on_client_readable)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._schedule_expiry()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop forwarding: remove readers and timers, drop queued datagrams, close sockets."""
        loop = self._loop
        if loop is None:
            return
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for path in self._paths:
            if path.timer is not None:
                path.timer.cancel()
                path.timer = None
            path.heap.clear()
            path.queued_bytes = 0
        for flow in list(self._flows.values()):
            self._close_flow(flow)
        if self._sock is not None:
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._loop = None

    # ----------------------------------------------------------------- public API

    def set_impairment(self, impairment: Impairment) -> None:
        """Change the settings while running. Random streams restart only if the seed changes.

        The blackhole state is left alone; use :meth:`blackhole` for it.
        """
        if impairment.seed is not None and impairment.seed != self._seed:
            self._seed = impairment.seed
            for path in self._paths:
                path.rand = LinkRandom(self._seed, path.direction)
        self._impairment = impairment

    def blackhole(self, on: bool = True) -> None:
        """While on, drop every datagram both ways (including ones already queued)."""
        self._blackholed = bool(on)

    async def blackhole_for(self, seconds: float) -> None:
        """Blackhole the link for ``seconds``, then restore it (also if cancelled)."""
        self.blackhole(True)
        try:
            await anyio.sleep(seconds)
        finally:
            self.blackhole(False)

    def stats(self) -> UdpRelayStats:
        return UdpRelayStats(
            upstream=self._paths[0].stats.copy(),
            downstream=self._paths[1].stats.copy(),
            flows_active=len(self._flows),
            flows_created=self._flows_created,
            flows_expired=self._flows_expired,
            flows_refused=self._flows_refused,
            seed=self._seed,
            blackholed=self._blackholed,
        )

    # ----------------------------------------------------------------- flows

    def _tune(self, sock: socket.socket) -> None:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, self._socket_buffer)
            except OSError:
                pass

    def _open_flow(self, client: tuple[str, int], now: float) -> _Flow | None:
        assert self._loop is not None
        if len(self._flows) >= self._max_flows:
            self._flows_refused += 1
            return None
        family = socket.AF_INET6 if ":" in self._target[0] else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:
            self._flows_refused += 1
            return None
        try:
            sock.setblocking(False)
            self._tune(sock)
            sock.connect(self._target)
        except OSError:
            sock.close()
            self._flows_refused += 1
            return None
        flow = _Flow(client, sock, now)
        self._loop.add_reader(flow.fd, self._on_target_readable, flow)
        self._flows[client] = flow
        self._flows_created += 1
        return flow

    def _close_flow(self, flow: _Flow) -> None:
        if flow.closed:
            return
        flow.closed = True
        if self._loop is not None:
            self._loop.remove_reader(flow.fd)
        flow.sock.close()
        if self._flows.get(flow.client) is flow:
            del self._flows[flow.client]

    def _schedule_expiry(self) -> None:
        assert self._loop is not None
        interval = min(max(self._idle_timeout / 4, 0.05), 5.0)
        self._expiry = self._loop.call_later(interval, self._expire_idle)

    def _expire_idle(self) -> None:
        assert self._loop is not None
        cutoff = self._loop.time() - self._idle_timeout
        for flow in [f for f in self._flows.values() if f.last_active < cutoff and f.pending == 0]:
            self._close_flow(flow)
            self._flows_expired += 1
        self._schedule_expiry()

    # ----------------------------------------------------------------- receive

    def _on_client_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        loop = self._loop
        assert loop is not None
        now = loop.time()
        path = self._paths[0]
        for _ in range(_READ_BATCH):
            try:
                data, client = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ICMP errors (e.g. a client port that went away) surface here on Linux.
                continue
            client = client[:2]
            flow = self._flows.get(client)
            if flow is None:
                flow = self._open_flow(client, now)
                if flow is None:
                    path.stats.dropped_overflow += 1
                    continue
            flow.last_active = now
            self._admit(path, flow, data, now)

    def _on_target_readable(self, flow: _Flow) -> None:
        if flow.closed:
            return
        loop = self._loop
        assert loop is not None
        now = loop.time()
        path = self._paths[1]
        for _ in range(_READ_BATCH):
            try:
                data = flow.sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ECONNREFUSED from an earlier send: the target port is closed right now.
                continue
            flow.last_active = now
            self._admit(path, flow, data, now)

    # ----------------------------------------------------------------- impair and queue

    def _admit(self, path: _Path, flow: _Flow, data: bytes, now: float) -> None:
        stats = path.stats
        if self._blackholed:
            stats.dropped_blackhole += 1
            return
        imp = self._impairment
        link = imp.link(path.direction)
        if link.loss > 0.0 and path.rand.loss.random() < link.loss:
            stats.dropped_loss += 1
            return
        if (
            len(path.heap) >= self._max_queued
            or path.queued_bytes + len(data) > self._max_queued_bytes
        ):
            stats.dropped_overflow += 1
            return
        lane = flow.lanes[0 if path.direction is _UP else 1]
        due = now + path.rand.delay_s(link)
        if lane.held is None:
            if link.reorder > 0.0 and path.rand.reorder.random() < link.reorder:
                # Hold it back; a release marker bounds how long it waits for overtakers.
                lane.held = data
                lane.held_due = due
                lane.held_overtaken = 0
                flow.pending += 1
                path.queued_bytes += len(data)
                lane.held_token = token = next(self._seq)
                self._push(path, (now + imp.reorder_hold_ms / 1000.0, token, flow, None))
                return
            if due <= now and not path.heap:
                # No delay and nothing ahead of it: forward straight away.
                self._send(path, flow, data)
                return
        self._enqueue(path, flow, lane, data, due)
        if lane.held is not None:
            lane.held_overtaken += 1
            if lane.held_overtaken >= imp.reorder_gap:
                self._release_held(path, flow, lane)

    def _enqueue(self, path: _Path, flow: _Flow, lane: _Lane, data: bytes, due: float) -> None:
        due = max(due, lane.last_due)  # jitter never reorders a flow
        lane.last_due = due
        flow.pending += 1
        path.queued_bytes += len(data)
        self._push(path, (due, next(self._seq), flow, data))

    def _release_held(self, path: _Path, flow: _Flow, lane: _Lane) -> None:
        data = lane.held
        if data is None:
            return
        lane.held = None
        flow.pending -= 1
        path.queued_bytes -= len(data)
        if lane.held_overtaken > 0:
            path.stats.reordered += 1
        self._enqueue(path, flow, lane, data, lane.held_due)

    def _push(self, path: _Path, entry: _Entry) -> None:
        heapq.heappush(path.heap, entry)
        self._arm(path)

    def _arm(self, path: _Path) -> None:
        if not path.heap:
            return
        due = path.heap[0][0]
        if path.timer is not None:
            if path.timer_due <= due:
                return
            path.timer.cancel()
        assert self._loop is not None
        path.timer_due = due
        path.timer = self._loop.call_at(due, self._on_timer, path)

    def _on_timer(self, path: _Path) -> None:
        path.timer = None
        loop = self._loop
        if loop is None:
            return
        horizon = loop.time() + _EARLY_S
        heap = path.heap
        while heap and heap[0][0] <= horizon:
            _, seq, flow, data = heapq.heappop(heap)
            if data is None:
                # Release marker: only for the hold that pushed it, if still held.
                lane = flow.lanes[0 if path.direction is _UP else 1]
                if lane.held_token == seq:
                    self._release_held(path, flow, lane)
                continue
            flow.pending -= 1
            path.queued_bytes -= len(data)
            if self._blackholed:
                path.stats.dropped_blackhole += 1
                continue
            self._send(path, flow, data)
        self._arm(path)

    def _send(self, path: _Path, flow: _Flow, data: bytes) -> None:
        stats = path.stats
        try:
            if path.direction is _UP:
                if flow.closed:
                    raise OSError("flow closed")
                flow.sock.send(data)
            else:
                if self._sock is None:
                    raise OSError("relay closed")
                self._sock.sendto(data, flow.client)
        except OSError:
            stats.dropped_send_error += 1
            return
        stats.forwarded += 1
        stats.bytes_forwarded += len(data)
