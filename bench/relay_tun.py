"""A relay whose impaired segment is a packet-level link: real kernel TCP (and QUIC) under loss.

Theory of operation
-------------------
:class:`~bench.relay_tcp.TcpRelay` terminates TCP, so it can only *simulate* a lost segment
(a stall); the kernel's congestion control on either end never sees a loss. This relay puts a
real IP link in the path instead, so every transport meets the same packet loss and delay:

    device --TCP/UDP--> 10.199.N.1:port  (root namespace, routed out of TUN device mgtNr)
           == TunLink: the relay reads each IP packet from mgtNr's fd, drops / delays it,
              writes it to mgtNn's fd (and the same way back) ==
    mgtNn in namespace margo-tun-N --> port forwarder listening on 10.199.N.1:port
           --loopback--> target (a socket made in the root namespace)

:class:`~bench.tun_net.TunPair` makes the namespace and the two TUN devices.
:class:`TunLink` forwards packets between the two descriptors on the asyncio loop
(``add_reader`` for each fd, one ``call_at`` timer per direction, no task per packet). Each
packet, in each direction: blackhole check -> loss draw -> bounded queue check -> delay draw
(``delay +- jitter``) -> optional reorder hold (``reorder``: held ``reorder_hold_ms`` longer,
so later packets overtake it) -> the direction's queue, a heap by due time -> written to the
other device. The random draws are :class:`~bench.impairment.LinkRandom`'s, in the UDP relay's
order, so the n-th packet of a direction meets the same fate for the same seed. Unlike the UDP
relay, jitter may reorder packets (as on a real link, or netem): a packet with less delay
overtakes an earlier one; ``reordered`` counts packets written after a later one. Each queue
holds at most ``max_queued`` packets and ``max_queued_bytes``; arrivals beyond it are dropped
(drop-tail) and counted as ``dropped_overflow``. ``forwarded`` / ``bytes_forwarded`` count IP
packets and their bytes (IP header included) written to the other side.

The port forwarder in the namespace is the plain :class:`~bench.relay_tcp.TcpRelay` or
:class:`~bench.relay_udp.UdpRelay` with no impairment, created while the thread is in the
namespace (so it listens there) and connecting to the target from the root namespace (its
upstream sockets are made later, outside). So the device <-> forwarder hop is a real TCP
connection (or the QUIC datagrams) over a lossy, slow link whose losses both kernels' TCP
stacks recover from with their own retransmissions and congestion control; the forwarder <->
target hop is loopback. ``rto_ms`` has no meaning here (the kernel's TCP decides).

Command line: the same as ``python -m bench.relay`` (``--listen``'s host is ignored: the relay
listens on the namespace's address, on ``--listen``'s port), the same ready line on stdout
with the address devices dial (10.199.N.1:port), and the stats as JSON on SIGINT / SIGTERM::

    python -m bench.relay_tun tcp --target 127.0.0.1:4434 --loss 0.02 --delay-ms 50 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from .impairment import (
    Direction,
    DirectionStats,
    Impairment,
    ImpairmentError,
    LinkRandom,
    RelayProperties,
    effective_seed,
)
from .relay import _parser as relay_parser
from .relay_tcp import TcpRelay
from .relay_udp import UdpRelay
from .tun_net import TunError, TunPair

__all__ = ["TunLink", "TunRelay", "TunRelayStats", "main"]

_UP = Direction.UPSTREAM
_DOWN = Direction.DOWNSTREAM
_MAX_PACKET = 65_535
_READ_BATCH = 256  # packets read per readiness callback before yielding to the loop
_EARLY_S = 0.0002  # write packets due within this much of now in the same timer callback

# Heap entry: (due, sequence, packet).
_Entry = tuple[float, int, bytes]


@dataclass(slots=True)
class _Pipe:
    """One direction of the link: its descriptors, randomness, queue and counters."""

    direction: Direction
    src: int
    dst: int
    rand: LinkRandom
    stats: DirectionStats = field(default_factory=DirectionStats)
    heap: list[_Entry] = field(default_factory=list)
    queued_bytes: int = 0
    timer: asyncio.TimerHandle | None = None
    timer_due: float = 0.0
    last_sent_seq: int = -1


class TunLink:
    """Impaired packet forwarding between two TUN descriptors (see the module doc).

    ``fds`` is (root side, namespace side): packets read from the first travel upstream.
    """

    def __init__(
        self,
        fds: tuple[int, int],
        impairment: Impairment,
        *,
        seed: int,
        max_queued: int = 1000,
        max_queued_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        if max_queued < 1 or max_queued_bytes < 1:
            raise ValueError("max_queued and max_queued_bytes must be > 0")
        self.impairment = impairment
        self.blackholed = impairment.blackhole
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        root, ns = fds
        self._pipes = (
            _Pipe(_UP, root, ns, LinkRandom(seed, _UP)),
            _Pipe(_DOWN, ns, root, LinkRandom(seed, _DOWN)),
        )
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for pipe in self._pipes:
            loop.add_reader(pipe.src, self._on_readable, pipe)

    def close(self) -> None:
        """Stop: remove readers and timers, drop whatever is queued (descriptors stay open)."""
        loop, self._loop = self._loop, None
        for pipe in self._pipes:
            if loop is not None:
                loop.remove_reader(pipe.src)
            if pipe.timer is not None:
                pipe.timer.cancel()
                pipe.timer = None
            pipe.heap.clear()
            pipe.queued_bytes = 0

    def reseed(self, seed: int) -> None:
        for pipe in self._pipes:
            pipe.rand = LinkRandom(seed, pipe.direction)

    def stats(self) -> tuple[DirectionStats, DirectionStats]:
        return self._pipes[0].stats.copy(), self._pipes[1].stats.copy()

    def queued(self) -> int:
        """Packets waiting in both directions' queues."""
        return sum(len(pipe.heap) for pipe in self._pipes)

    # ----------------------------------------------------------------- forwarding

    def _on_readable(self, pipe: _Pipe) -> None:
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        for _ in range(_READ_BATCH):
            try:
                packet = os.read(pipe.src, _MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the device went away (closing)
            self._admit(pipe, packet, now)

    def _admit(self, pipe: _Pipe, packet: bytes, now: float) -> None:
        stats = pipe.stats
        if self.blackholed:
            stats.dropped_blackhole += 1
            return
        imp = self.impairment
        link = imp.link(pipe.direction)
        rand = pipe.rand
        if link.loss > 0.0 and rand.loss.random() < link.loss:
            stats.dropped_loss += 1
            return
        if (
            len(pipe.heap) >= self.max_queued
            or pipe.queued_bytes + len(packet) > self.max_queued_bytes
        ):
            stats.dropped_overflow += 1
            return
        due = now + rand.delay_s(link)
        if link.reorder > 0.0 and rand.reorder.random() < link.reorder:
            due += imp.reorder_hold_ms / 1000.0
        seq = next(self._seq)
        if due <= now and not pipe.heap:
            self._write(pipe, seq, packet)  # no delay and nothing ahead of it
            return
        pipe.queued_bytes += len(packet)
        heapq.heappush(pipe.heap, (due, seq, packet))
        self._arm(pipe)

    def _arm(self, pipe: _Pipe) -> None:
        if not pipe.heap or self._loop is None:
            return
        due = pipe.heap[0][0]
        if pipe.timer is not None:
            if pipe.timer_due <= due:
                return
            pipe.timer.cancel()
        pipe.timer_due = due
        pipe.timer = self._loop.call_at(due, self._on_timer, pipe)

    def _on_timer(self, pipe: _Pipe) -> None:
        pipe.timer = None
        loop = self._loop
        if loop is None:
            return
        horizon = loop.time() + _EARLY_S
        heap = pipe.heap
        while heap and heap[0][0] <= horizon:
            _, seq, packet = heapq.heappop(heap)
            pipe.queued_bytes -= len(packet)
            if self.blackholed:  # it was on the wire of a link that died
                pipe.stats.dropped_blackhole += 1
                continue
            self._write(pipe, seq, packet)
        self._arm(pipe)

    def _write(self, pipe: _Pipe, seq: int, packet: bytes) -> None:
        stats = pipe.stats
        try:
            os.write(pipe.dst, packet)
        except OSError:
            stats.dropped_send_error += 1
            return
        if seq < pipe.last_sent_seq:
            stats.reordered += 1
        else:
            pipe.last_sent_seq = seq
        stats.forwarded += 1
        stats.bytes_forwarded += len(packet)


# --------------------------------------------------------------------------- the relay


@dataclass(frozen=True, slots=True)
class TunRelayStats:
    """A snapshot of a :class:`TunRelay`: the link's counters (packets) and the forwarder's."""

    upstream: DirectionStats
    downstream: DirectionStats
    forwarder: dict[str, object]
    namespace: str
    root_address: str
    namespace_address: str
    max_queued: int
    seed: int
    blackholed: bool

    def to_dict(self) -> dict[str, object]:
        # The forwarder's own counters (flows or connections) at the top level, as the UDP
        # and TCP relays report them; its per-direction counters (chunks on loopback) nested.
        out = {
            k: v for k, v in self.forwarder.items() if k not in ("seed", "blackholed", "upstream")
        }
        out.pop("downstream", None)
        out.update(
            {
                "link": "tun",
                "upstream": self.upstream.to_dict(),
                "downstream": self.downstream.to_dict(),
                "forwarder": {k: self.forwarder.get(k) for k in ("upstream", "downstream")},
                "namespace": self.namespace,
                "root_address": self.root_address,
                "namespace_address": self.namespace_address,
                "max_queued": self.max_queued,
                "seed": self.seed,
                "blackholed": self.blackholed,
            }
        )
        return out


class TunRelay(RelayProperties):
    """A ``protocol`` ("udp" or "tcp") relay to ``target`` through a packet-level link.

    ``async with TunRelay("tcp", target=("127.0.0.1", port), impairment=...) as r:`` makes the
    namespace and devices, listens on ``r.address`` (10.199.N.1, ``listen``'s port) and forwards
    until the block ends; then everything is removed. Needs root and /dev/net/tun
    (:func:`bench.tun_net.unavailable_reason`).
    """

    def __init__(
        self,
        protocol: str,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        target: tuple[str, int] | None = None,
        impairment: Impairment | None = None,
        *,
        max_queued: int = 1000,
        max_queued_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        if protocol not in ("udp", "tcp"):
            raise ValueError(f"protocol must be udp or tcp, got {protocol!r}")
        if target is None:
            raise TypeError("TunRelay needs a target=(host, port)")
        self.protocol = protocol
        self._listen = listen
        self._target = target
        self._impairment = impairment if impairment is not None else Impairment()
        self._seed = effective_seed(self._impairment.seed)
        self._blackholed = self._impairment.blackhole
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes
        self._address: tuple[str, int] | None = None
        self._pair: TunPair | None = None
        self._link: TunLink | None = None
        self._forwarder: UdpRelay | TcpRelay | None = None

    @property
    def pair(self) -> TunPair | None:
        """The namespace and devices while running."""
        return self._pair

    async def __aenter__(self) -> TunRelay:
        loop = asyncio.get_running_loop()
        pair = await asyncio.to_thread(TunPair.create)
        self._pair = pair
        try:
            forwarder: UdpRelay | TcpRelay
            listen = (pair.ns_addr, self._listen[1])
            if self.protocol == "udp":
                forwarder = UdpRelay(listen, self._target, Impairment())
            else:
                forwarder = TcpRelay(listen, self._target, Impairment(), emulate_handshake=False)
            # Only the listening socket is made in the namespace: nothing else runs on this
            # loop yet, and the forwarder makes its upstream sockets later, back outside.
            with pair.inside():
                await forwarder.__aenter__()
            self._forwarder = forwarder
            self._link = TunLink(
                (pair.root_fd, pair.ns_fd),
                self._impairment,
                seed=self._seed,
                max_queued=self._max_queued,
                max_queued_bytes=self._max_queued_bytes,
            )
            self._link.blackholed = self._blackholed
            self._link.start(loop)
            self._address = forwarder.address
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._address = None
        if self._link is not None:
            self._link.close()
        forwarder, self._forwarder = self._forwarder, None
        try:
            if forwarder is not None:
                await forwarder.__aexit__(None, None, None)
        finally:
            if self._pair is not None:
                self._pair.close()

    def set_impairment(self, impairment: Impairment) -> None:
        """Change the settings while running. Random streams restart only if the seed changes."""
        if impairment.seed is not None and impairment.seed != self._seed:
            self._seed = impairment.seed
            if self._link is not None:
                self._link.reseed(self._seed)
        self._impairment = impairment
        if self._link is not None:
            self._link.impairment = impairment

    def blackhole(self, on: bool = True) -> None:
        """While on, drop every packet both ways (including ones already queued)."""
        self._blackholed = bool(on)
        if self._link is not None:
            self._link.blackholed = self._blackholed

    def stats(self) -> TunRelayStats:
        up, down = self._link.stats() if self._link is not None else (None, None)
        pair = self._pair
        return TunRelayStats(
            upstream=up or DirectionStats(),
            downstream=down or DirectionStats(),
            forwarder=self._forwarder.stats().to_dict() if self._forwarder is not None else {},
            namespace=pair.namespace if pair else "",
            root_address=pair.root_addr if pair else "",
            namespace_address=pair.ns_addr if pair else "",
            max_queued=self._max_queued,
            seed=self._seed,
            blackholed=self._blackholed,
        )


# --------------------------------------------------------------------------- command line


async def _serve(args: argparse.Namespace, impairment: Impairment) -> dict[str, object]:
    relay = TunRelay(args.protocol, args.listen, args.target, impairment)
    stats: dict[str, object] = {}
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with relay:
            host, port = relay.address
            target = f"{args.target[0]}:{args.target[1]}"
            settings = json.dumps(impairment.to_dict())
            print(f"relay {args.protocol} {host}:{port} -> {target} seed={relay.seed} {settings}")
            sys.stdout.flush()
            with anyio.move_on_after(args.duration):
                async for _ in signals:
                    break
            stats.update(relay.stats().to_dict())
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Run one relay until SIGINT / SIGTERM (or ``--duration``); print its stats as JSON."""
    parser = relay_parser()
    parser.prog = "python -m bench.relay_tun"
    parser.description = "UDP/TCP relay through a packet-level impaired link (TUN, namespace)."
    args = parser.parse_args(argv)
    names = ("loss", "delay_ms", "jitter_ms", "reorder", "seed", "blackhole", "rto_ms")
    try:
        impairment = Impairment(**{name: getattr(args, name) for name in names})
        stats = anyio.run(_serve, args, impairment, backend="asyncio")
    except (ImpairmentError, TunError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ImpairmentError) else 1
    print(json.dumps(stats, indent=2, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
