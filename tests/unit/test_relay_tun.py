"""Tests of the packet-level relay (bench.relay_tun): real kernel TCP and UDP through a TUN link
in a private namespace, with loss and delay. They need root and /dev/net/tun.

The only timing asserted is the delay under test (a round trip of at least twice the one-way
delay); everything else waits on data with timeouts.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from bench.impairment import Impairment
from bench.relay_tun import TunRelay
from bench.tun_net import unavailable_reason

_REASON = unavailable_reason()
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(_REASON is not None, reason=f"packet-level relay: {_REASON}"),
]

LOOPBACK = "127.0.0.1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def tcp_echo() -> AsyncIterator[int]:
    """A loopback TCP echo server (echoes until EOF, then closes); yields its port."""

    async def handle(stream: SocketStream) -> None:
        async with stream:
            try:
                while True:
                    await stream.send(await stream.receive(65_536))
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass

    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def echo_all(stream: SocketStream, payload: bytes) -> bytes:
    """Send ``payload`` and read back as many bytes."""
    got = bytearray()
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.send, payload)
        while len(got) < len(payload):
            got += await stream.receive(65_536)
    return bytes(got)


async def test_tcp_echo_with_delay() -> None:
    imp = Impairment(delay_ms=20.0, seed=1)
    async with tcp_echo() as port, TunRelay("tcp", target=(LOOPBACK, port), impairment=imp) as r:
        assert r.address[0].startswith("10.199.")
        with anyio.fail_after(5):
            async with await anyio.connect_tcp(*r.address) as stream:
                rtts = []
                for i in range(3):
                    t0 = time.monotonic()
                    assert await echo_all(stream, b"ping %d" % i) == b"ping %d" % i
                    rtts.append(time.monotonic() - t0)
                payload = bytes(range(256)) * 1024  # 256 KiB over the link and back
                assert await echo_all(stream, payload) == payload
        assert min(rtts) >= 0.0395, rtts  # 20 ms each way (timers may fire 0.2 ms early)
        assert max(rtts) < 1.0, rtts
        stats = r.stats().to_dict()
    for way in ("upstream", "downstream"):
        counters = stats[way]
        assert isinstance(counters, dict)
        assert counters["forwarded"] > 100 and counters["bytes_forwarded"] > len(payload)
        assert counters["dropped_loss"] == 0 and counters["dropped_overflow"] == 0
    assert stats["link"] == "tun" and stats["connections_total"] == 1


async def test_udp_echo() -> None:
    loop = asyncio.get_running_loop()
    server, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(LOOPBACK, 0))
    port = server.get_extra_info("sockname")[1]
    try:
        imp = Impairment(delay_ms=5.0, seed=1)
        async with TunRelay("udp", target=(LOOPBACK, port), impairment=imp) as r:
            with anyio.fail_after(5):
                async with await anyio.create_connected_udp_socket(*r.address) as sock:
                    for i in range(10):
                        message = b"datagram %d " % i + bytes(1200)  # near QUIC's size
                        await sock.send(message)
                        assert await sock.receive() == message
            stats = r.stats().to_dict()
    finally:
        server.close()
    assert stats["flows_created"] == 1
    for way in ("upstream", "downstream"):
        counters = stats[way]
        assert isinstance(counters, dict) and counters["forwarded"] == 10


async def test_tcp_under_heavy_loss_delivers_everything() -> None:
    # 30 % of the packets each way are dropped; the kernel's TCP retransmits them. (A seed
    # that spares the SYN: a lost SYN alone costs TCP's 1 s initial timeout, doubling.)
    imp = Impairment(loss=0.3, delay_ms=2.0, seed=3)
    async with tcp_echo() as port, TunRelay("tcp", target=(LOOPBACK, port), impairment=imp) as r:
        payload = bytes(range(251)) * 120  # 30 KB, about 21 segments each way
        with anyio.fail_after(8):
            async with await anyio.connect_tcp(*r.address) as stream:
                assert await echo_all(stream, payload) == payload
        stats = r.stats().to_dict()
    up, down = stats["upstream"], stats["downstream"]
    assert isinstance(up, dict) and isinstance(down, dict)
    assert up["dropped_loss"] > 0 and down["dropped_loss"] > 0


async def test_namespace_and_devices_removed_on_exit() -> None:
    async with tcp_echo() as port:
        async with TunRelay("tcp", target=(LOOPBACK, port)) as r:
            pair = r.pair
            assert pair is not None and pair.exists()
            names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
            assert pair.namespace in names.stdout
        assert not pair.exists()
        assert not Path(f"/sys/class/net/{pair.root_device}").exists()


def test_command_line_stops_on_sigterm_and_cleans_up() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.relay_tun", "udp", "--target", "127.0.0.1:9", "--seed", "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "relay udp 10.199.N.1:PORT -> 127.0.0.1:9 seed=3 {...}"
        words = line.split()
        assert words[:2] == ["relay", "udp"] and words[2].startswith("10.199."), line
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    stats = json.loads(out)
    assert stats["seed"] == 3 and stats["link"] == "tun"
    assert not Path("/run/netns", stats["namespace"]).exists()
