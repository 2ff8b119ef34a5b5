"""Tests of the userspace impairment relays over real loopback sockets (no mocks).

Waiting is done on conditions with timeouts (``wait_until``); the only sleeps are the ones
whose duration is the quantity under test (a blackhole lasting a while, a reply not arriving).
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream

from bench.impairment import Direction, LinkRandom
from bench.relay import Impairment, ImpairmentError, Link, TcpRelay, UdpRelay

pytestmark = pytest.mark.anyio

LOOPBACK = "127.0.0.1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` (state owned by the event loop) until it holds or fail."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.001)


# --------------------------------------------------------------------------- UDP helpers


class _Datagrams(asyncio.DatagramProtocol):
    """A loopback UDP server that handles each datagram in the receive callback (no queue
    that could overflow): echoes it back, or records its sequence number."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.seqs: list[int] = []
        self.sources: set[tuple[str, int]] = set()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if self.echo:
            self.transport.sendto(data, addr)
        else:
            self.seqs.append(struct.unpack("!I", data[:4])[0])
            self.sources.add(addr[:2])

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]


@asynccontextmanager
async def _udp_server(echo: bool) -> AsyncIterator[_Datagrams]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Datagrams(echo), local_addr=(LOOPBACK, 0)
    )
    try:
        yield proto
    finally:
        transport.close()


@asynccontextmanager
async def udp_echo() -> AsyncIterator[int]:
    async with _udp_server(echo=True) as server:
        yield server.port


@asynccontextmanager
async def udp_sink() -> AsyncIterator[tuple[_Datagrams, int]]:
    async with _udp_server(echo=False) as server:
        yield server, server.port


async def blast(relay: UdpRelay, sink: _Datagrams, count: int, batch: int = 100) -> None:
    """Send ``count`` numbered datagrams through ``relay``, a batch at a time; wait until the
    relay has decided each one's fate and the sink has every datagram the relay forwarded."""
    async with await anyio.create_connected_udp_socket(*relay.address) as client:
        sent = 0
        while sent < count:
            for _ in range(min(batch, count - sent)):
                await client.send(struct.pack("!I", sent) + b"x" * 60)
                sent += 1

            def settled(sent: int = sent) -> bool:
                up = relay.stats().upstream
                decided = up.forwarded + up.dropped_loss + up.dropped_overflow
                return decided == sent and len(sink.seqs) == up.forwarded

            await wait_until(settled)


async def udp_ping(sock: anyio.abc.ConnectedUDPSocket, seq: int, timeout: float = 2.0) -> float:
    start = anyio.current_time()
    await sock.send(struct.pack("!I", seq))
    with anyio.fail_after(timeout):
        while True:
            data = await sock.receive()
            if struct.unpack("!I", data[:4])[0] == seq:
                return anyio.current_time() - start


# --------------------------------------------------------------------------- Impairment


def test_impairment_validation() -> None:
    for bad in (
        {"loss": 1.5},
        {"loss": -0.1},
        {"delay_ms": -1},
        {"jitter_ms": float("nan")},
        {"reorder": 2},
        {"seed": True},
        {"reorder_gap": 0},
        {"rto_ms": -5},
        {"loss": "0.1"},
    ):
        with pytest.raises(ImpairmentError) as info:
            Impairment(**bad)  # type: ignore[arg-type]
        assert next(iter(bad)) in str(info.value)
    with pytest.raises(ValueError, match="loss must be between 0 and 1"):
        Link(loss=3)
    imp = Impairment(loss=0.1, delay_ms=20, downstream=Link(delay_ms=80))
    assert imp.link(Direction.UPSTREAM) == Link(loss=0.1, delay_ms=20)
    assert imp.link(Direction.DOWNSTREAM) == Link(delay_ms=80)
    assert imp.rto_s(Direction.UPSTREAM) == pytest.approx(0.2)
    assert imp.rto_s(Direction.DOWNSTREAM) == pytest.approx(0.32)
    assert Impairment(rto_ms=50).rto_s(Direction.UPSTREAM) == pytest.approx(0.05)
    assert json.dumps(imp.to_dict())


# --------------------------------------------------------------------------- UDP


async def test_udp_loss_rate_and_seeded_pattern() -> None:
    patterns = []
    for seed in (7, 7, 8):
        async with udp_sink() as (sink, port):
            imp = Impairment(loss=0.10, seed=seed)
            async with UdpRelay(target=(LOOPBACK, port), impairment=imp) as relay:
                await blast(relay, sink, 5_000)
                stats = relay.stats()
        lost = 5_000 - len(sink.seqs)
        assert stats.upstream.dropped_loss == lost
        assert 0.08 <= lost / 5_000 <= 0.12, lost
        assert sink.seqs == sorted(sink.seqs)  # no reorder configured: none happens
        patterns.append(set(range(5_000)) - set(sink.seqs))
    assert patterns[0] == patterns[1]  # same seed, same datagrams dropped
    assert patterns[0] != patterns[2]


async def test_udp_delay_round_trip() -> None:
    async with udp_echo() as echo:
        imp = Impairment(delay_ms=50, seed=1)
        async with UdpRelay(target=(LOOPBACK, echo), impairment=imp) as relay:
            async with await anyio.create_connected_udp_socket(*relay.address) as client:
                rtts = [await udp_ping(client, i) for i in range(10)]
    # Never early. On a quiet machine the median is within 2 ms; the upper bounds leave room
    # for a loaded CI machine (scheduling delay of the test's own tasks adds to the RTT).
    assert min(rtts) >= 0.099 and max(rtts) <= 0.200, rtts
    assert 0.099 <= statistics.median(rtts) <= 0.125, rtts


async def test_udp_jitter_round_trip() -> None:
    async with udp_echo() as echo:
        imp = Impairment(delay_ms=20, jitter_ms=10, seed=3)
        async with UdpRelay(target=(LOOPBACK, echo), impairment=imp) as relay:
            async with await anyio.create_connected_udp_socket(*relay.address) as client:
                rtts = [await udp_ping(client, i) for i in range(60)]
    # Each way 10..30 ms, so the round trip is 20..60 ms around a mean of 40 ms.
    assert min(rtts) >= 0.0195 and max(rtts) <= 0.120, rtts
    assert 0.034 <= statistics.median(rtts) <= 0.060, rtts
    assert 0.004 <= statistics.stdev(rtts) <= 0.020  # uniform +-10 ms twice: about 8 ms


async def test_udp_asymmetric_delay() -> None:
    async with udp_echo() as echo:
        imp = Impairment(upstream=Link(delay_ms=10), downstream=Link(delay_ms=60))
        async with UdpRelay(target=(LOOPBACK, echo), impairment=imp) as relay:
            async with await anyio.create_connected_udp_socket(*relay.address) as client:
                rtts = [await udp_ping(client, i) for i in range(5)]
    assert min(rtts) >= 0.069 and statistics.median(rtts) <= 0.095, rtts


async def test_udp_reorder_counted_exactly() -> None:
    async with udp_sink() as (sink, port):
        imp = Impairment(reorder=0.2, seed=11)
        async with UdpRelay(target=(LOOPBACK, port), impairment=imp) as relay:
            await blast(relay, sink, 3_000)
            await wait_until(lambda: len(sink.seqs) == 3_000)
            stats = relay.stats()
    assert sorted(sink.seqs) == list(range(3_000))  # reordered, nothing lost
    highest, late = -1, 0
    for seq in sink.seqs:
        if seq < highest:
            late += 1
        highest = max(highest, seq)
    assert late == stats.upstream.reordered
    assert 0.16 <= late / 3_000 <= 0.24, late


async def test_udp_blackhole_drops_then_recovers() -> None:
    async with udp_echo() as echo:
        async with UdpRelay(target=(LOOPBACK, echo), impairment=Impairment()) as relay:
            async with await anyio.create_connected_udp_socket(*relay.address) as client:
                await udp_ping(client, 0)
                relay.blackhole(True)
                for i in range(1, 51):
                    await client.send(struct.pack("!I", i))
                await wait_until(lambda: relay.stats().upstream.dropped_blackhole == 50)
                with anyio.move_on_after(0.2) as quiet:
                    await client.receive()
                assert quiet.cancelled_caught, "a datagram crossed a blackholed link"
                relay.blackhole(False)
                await udp_ping(client, 100)
                # blackhole_for: pings fail while it lasts, then succeed again.
                async with anyio.create_task_group() as tg:
                    start = anyio.current_time()
                    tg.start_soon(relay.blackhole_for, 0.3)
                    await wait_until(lambda: relay.blackholed)
                    seq = 200
                    while True:
                        seq += 1
                        try:
                            await udp_ping(client, seq, timeout=0.05)
                            break
                        except TimeoutError:
                            pass
                    assert anyio.current_time() - start >= 0.29
                stats = relay.stats()
    assert stats.upstream.dropped_blackhole >= 50 + 3
    assert stats.downstream.dropped_blackhole == 0


async def test_udp_blackhole_drops_datagrams_already_queued() -> None:
    async with udp_sink() as (sink, port):
        imp = Impairment(delay_ms=200)
        async with UdpRelay(target=(LOOPBACK, port), impairment=imp) as relay:
            async with await anyio.create_connected_udp_socket(*relay.address) as client:
                for i in range(20):
                    await client.send(struct.pack("!I", i))
                await wait_until(lambda: sum(len(p.heap) for p in relay._paths) == 20)
                relay.blackhole(True)
                await wait_until(lambda: relay.stats().upstream.dropped_blackhole == 20)
    assert sink.seqs == []


async def test_udp_many_clients_and_idle_expiry() -> None:
    clients = 1_000
    async with udp_echo() as echo:
        imp = Impairment(delay_ms=5)
        relay = UdpRelay(target=(LOOPBACK, echo), impairment=imp, idle_timeout=1.0)
        async with relay:
            socks = []
            try:
                for _ in range(clients):
                    socks.append(await anyio.create_connected_udp_socket(*relay.address))
                for i, sock in enumerate(socks):
                    await sock.send(struct.pack("!I", i))
                with anyio.fail_after(10):
                    for i, sock in enumerate(socks):
                        assert struct.unpack("!I", await sock.receive())[0] == i
            finally:
                for sock in socks:
                    await sock.aclose()
            stats = relay.stats()
            assert stats.flows_created == clients and stats.flows_active == clients
            assert stats.upstream.forwarded == stats.downstream.forwarded == clients
            await wait_until(lambda: relay.stats().flows_active == 0, timeout=5)
            assert relay.stats().flows_expired == clients


async def test_udp_delay_queue_is_bounded() -> None:
    async with udp_sink() as (sink, port):
        imp = Impairment(delay_ms=500)
        relay = UdpRelay(target=(LOOPBACK, port), impairment=imp, max_queued=100)
        async with relay:
            await blast(relay, sink, 500, batch=500)
            stats = relay.stats()
    assert stats.upstream.dropped_overflow == 400
    assert sorted(sink.seqs) == list(range(100))


async def test_udp_close_releases_everything() -> None:
    tasks_before = len(asyncio.all_tasks())
    async with udp_echo() as echo:
        imp = Impairment(delay_ms=100)
        async with UdpRelay(target=(LOOPBACK, echo), impairment=imp) as relay:
            address = relay.address
            async with await anyio.create_connected_udp_socket(*relay.address) as client:
                for i in range(10):
                    await client.send(struct.pack("!I", i))
                await wait_until(lambda: relay.stats().flows_active == 1)
        assert all(p.timer is None and not p.heap for p in relay._paths)
        assert relay._expiry is None and relay.stats().flows_active == 0
    # The listening port is free again.
    async with await anyio.create_udp_socket(local_host=LOOPBACK, local_port=address[1]):
        pass
    assert len(asyncio.all_tasks()) == tasks_before


# --------------------------------------------------------------------------- TCP helpers


@asynccontextmanager
async def tcp_echo() -> AsyncIterator[int]:
    async with await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0) as listener:

        async def echo(stream: SocketStream) -> None:
            async with stream:
                try:
                    async for data in stream:
                        await stream.send(data)
                except (anyio.BrokenResourceError, OSError):
                    pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            yield listener.extra(SocketAttribute.local_port)
            tg.cancel_scope.cancel()


@asynccontextmanager
async def tcp_sink() -> AsyncIterator[tuple[list[tuple[float, bytes]], int]]:
    """A server that records (arrival time, chunk) for everything it receives."""
    received: list[tuple[float, bytes]] = []
    async with await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0) as listener:

        async def collect(stream: SocketStream) -> None:
            async with stream:
                async for data in stream:
                    received.append((anyio.current_time(), data))

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, collect)
            yield received, listener.extra(SocketAttribute.local_port)
            tg.cancel_scope.cancel()


async def tcp_ping(stream: SocketStream, payload: bytes = b"p" * 16) -> float:
    start = anyio.current_time()
    await stream.send(payload)
    got = b""
    with anyio.fail_after(10):
        while len(got) < len(payload):
            got += await stream.receive()
    assert got == payload
    return anyio.current_time() - start


# --------------------------------------------------------------------------- TCP


async def test_tcp_delay_and_handshake() -> None:
    async with tcp_echo() as port:
        imp = Impairment(delay_ms=30, seed=1)
        async with TcpRelay(target=(LOOPBACK, port), impairment=imp) as relay:
            started = anyio.current_time()  # the relay's clock for the handshake starts at accept
            async with await anyio.connect_tcp(*relay.address) as client:
                await tcp_ping(client)
                first = anyio.current_time() - started
                rtts = [await tcp_ping(client) for _ in range(10)]
            stats = relay.stats()
    # The first exchange also pays the SYN / SYN-ACK round trip: two RTTs from the connect
    # (measured from it, not from the send: on a loaded loop the client may resume late)
    assert 0.119 <= first <= 0.250, first
    assert min(rtts) >= 0.059 and 0.059 <= statistics.median(rtts) <= 0.085, rtts
    assert stats.upstream.forwarded == stats.downstream.forwarded == 11
    assert stats.connections_total == 1


async def test_tcp_order_preserved_under_jitter() -> None:
    async with tcp_echo() as port:
        imp = Impairment(delay_ms=10, jitter_ms=9, seed=5)
        relay = TcpRelay(target=(LOOPBACK, port), impairment=imp, chunk_size=512)
        async with relay:
            async with await anyio.connect_tcp(*relay.address) as client:
                payload = b"".join(struct.pack("!I", i) for i in range(20_000))
                got = bytearray()
                async with anyio.create_task_group() as tg:

                    async def writer() -> None:
                        for off in range(0, len(payload), 1000):
                            await client.send(payload[off : off + 1000])

                    tg.start_soon(writer)
                    with anyio.fail_after(20):
                        while len(got) < len(payload):
                            got += await client.receive()
            stats = relay.stats()
    assert bytes(got) == payload
    assert stats.upstream.forwarded >= 100  # really split into many jittered chunks


def _seed_for(pattern: list[bool], loss: float) -> int:
    """A seed whose first loss draws upstream are: lost (no repeat), then ``pattern``."""
    for seed in range(10_000):
        rng = LinkRandom(seed, Direction.UPSTREAM).loss
        draws = [rng.random() < loss for _ in range(2 + len(pattern))]
        if draws == [True, False, *pattern]:
            return seed
    raise AssertionError("no seed found")


async def test_tcp_loss_rto_penalty_and_head_of_line_blocking() -> None:
    loss = 0.5
    seed = _seed_for([False], loss)  # chunk A lost once, chunk B not lost
    async with tcp_sink() as (received, port):
        imp = Impairment(upstream=Link(loss=loss, delay_ms=10), rto_ms=300, seed=seed)
        relay = TcpRelay(target=(LOOPBACK, port), impairment=imp, emulate_handshake=False)
        async with relay:
            async with await anyio.connect_tcp(*relay.address) as client:
                sent_a = anyio.current_time()
                await client.send(b"A" * 100)
                await wait_until(lambda: relay.stats().upstream.dropped_loss == 1)
                sent_b = anyio.current_time()
                await client.send(b"B" * 100)
                await wait_until(lambda: sum(len(d) for _, d in received) == 200)
            stats = relay.stats()
    data = b"".join(d for _, d in received)
    assert data == b"A" * 100 + b"B" * 100
    arrival_a = received[0][0]
    arrival_b = next(t for t, d in received if b"B" in d)
    assert 0.305 <= arrival_a - sent_a <= 0.380  # delay + RTO
    # B was not lost, yet it waited behind A: head-of-line blocking.
    assert arrival_b >= arrival_a and arrival_b - sent_b >= 0.25
    assert stats.upstream.dropped_loss == 1
    assert stats.upstream.rto_penalty_s == pytest.approx(0.3)


async def test_tcp_loss_penalty_accounts_for_round_trips() -> None:
    async with tcp_echo() as port:
        imp = Impairment(delay_ms=10, upstream=Link(loss=0.25, delay_ms=10), rto_ms=100, seed=21)
        relay = TcpRelay(target=(LOOPBACK, port), impairment=imp, emulate_handshake=False)
        async with relay:
            async with await anyio.connect_tcp(*relay.address) as client:
                rtts = [await tcp_ping(client) for _ in range(24)]
            stats = relay.stats()
    assert stats.upstream.dropped_loss >= 2
    # Every round trip costs 20 ms, plus the RTO penalties charged for emulated losses: the
    # pings that hit a loss took 20 ms + RTO (or more, with backoff), the others about 20 ms.
    penalty = stats.upstream.rto_penalty_s
    slow = [r - 0.020 for r in rtts if r >= 0.100]
    assert len(slow) >= 2 and min(rtts) >= 0.0195, rtts
    assert penalty - 0.005 <= sum(slow) <= penalty + 0.030 * len(slow), (rtts, stats)
    assert sum(rtts) >= 24 * 0.020 + penalty - 0.005
    assert stats.downstream.dropped_loss == 0


async def test_tcp_blackhole_stalls_recovers_and_reset_all() -> None:
    async with tcp_echo() as port:
        async with TcpRelay(target=(LOOPBACK, port), impairment=Impairment()) as relay:
            async with await anyio.connect_tcp(*relay.address) as client:
                await tcp_ping(client)
                relay.blackhole(True)
                start = anyio.current_time()
                await client.send(b"during-blackhole")
                with anyio.move_on_after(0.3) as quiet:
                    await client.receive()
                assert quiet.cancelled_caught, "bytes crossed a blackholed link"
                assert relay.stats().connections_active == 1  # stalled, not closed
                relay.blackhole(False)
                got = b""
                with anyio.fail_after(2):
                    while len(got) < len(b"during-blackhole"):
                        got += await client.receive()
                assert got == b"during-blackhole"
                assert anyio.current_time() - start >= 0.3
                assert await tcp_ping(client) < 0.05

                assert relay.reset_all() == 1
                with (
                    anyio.fail_after(2),
                    pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream, OSError)),
                ):
                    await client.receive()
            await wait_until(lambda: relay.stats().connections_active == 0)
            stats = relay.stats()
    assert stats.connections_reset == 1
    assert stats.upstream.dropped_blackhole >= 1  # the stall was counted


async def test_tcp_many_connections_and_clean_close() -> None:
    tasks_before = len(asyncio.all_tasks())
    async with tcp_echo() as port:
        imp = Impairment(delay_ms=5)
        async with TcpRelay(target=(LOOPBACK, port), impairment=imp) as relay:
            async with anyio.create_task_group() as tg:
                streams: list[SocketStream] = []

                async def one(i: int) -> None:
                    stream = await anyio.connect_tcp(*relay.address)
                    streams.append(stream)
                    await tcp_ping(stream, f"conn-{i:04d}".encode())

                for i in range(100):
                    tg.start_soon(one, i)
            assert relay.stats().connections_active == 100
            # Leave the connections open: closing the relay must still end every task.
        for stream in streams:
            await stream.aclose()
    assert len(asyncio.all_tasks()) == tasks_before


async def test_tcp_target_down_counts_connect_failure() -> None:
    async with await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0) as spare:
        closed_port = spare.extra(SocketAttribute.local_port)
    async with TcpRelay(target=(LOOPBACK, closed_port), impairment=Impairment()) as relay:
        async with await anyio.connect_tcp(*relay.address) as client:
            with (
                anyio.fail_after(2),
                pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream, OSError)),
            ):
                await client.receive()
        assert relay.stats().connect_failures == 1


# --------------------------------------------------------------------------- CLI


def test_cli_runs_and_prints_stats() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.relay", "udp", "--target", f"{LOOPBACK}:9"]
        + ["--loss", "0.02", "--delay-ms", "50", "--seed", "1", "--duration", "0.2"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    first, _, rest = proc.stdout.partition("\n")
    assert first.startswith("relay udp 127.0.0.1:") and "seed=1" in first
    stats = json.loads(rest)
    assert stats["seed"] == 1 and stats["upstream"]["forwarded"] == 0
    bad = subprocess.run(
        [sys.executable, "-m", "bench.relay", "tcp", "--target", f"{LOOPBACK}:9", "--loss", "2"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert bad.returncode == 2 and "loss must be between 0 and 1" in bad.stderr
