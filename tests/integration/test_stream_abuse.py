"""One device abusing streams against a real controller: bounded memory, closed connection,
other devices untouched.

(a) 30,000 streams each carrying one bad frame (the attack that grew the controller by 64 MiB:
every failed stream kept its exception and traceback until the connection ended). The
controller closes the connection after 1,000 failed streams with STREAM_LIMIT; the device
reconnects and goes on until 30,000 were sent.
(b) Streams each holding an unfinished 1 MiB frame (the attack that grew it by 103 MiB): the
connection is closed with BUFFER_LIMIT once 4 MiB are held, and the memory comes back.
"""

from __future__ import annotations

import asyncio
import gc
import struct
from pathlib import Path
from typing import Any

import anyio
import pytest

from margo_stream.protocol import messages as m
from margo_stream.protocol.channel import DEFAULT_MAX_FAILED_TOTAL, StreamFailed
from margo_stream.protocol.codes import DEFAULT_MAX_FRAME, ErrorCode
from margo_stream.transport.connection import Connection, ConnectionLost, MessageStream
from tests.harness import Controller
from tests.integration.rawclient import configuration, open_connection, say_hello

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

BAD = struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1"  # a frame that is not msgpack
STREAMS = 30_000
WINDOW = 48  # bad streams in flight at once (more than 64 unanswered is cut off at once)
MIB = 1 << 20


@pytest.fixture
def controller(pki, tmp_path):
    ctl = Controller(pki, tmp_path / "data")
    yield ctl
    ctl.stop()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Counting:
    """The abusing client's handler: counts the controller's resets of its streams."""

    def __init__(self) -> None:
        self.resets = 0

    def stream_opened(self, stream: MessageStream, first: Any) -> None:
        stream.reset(ErrorCode.PROTOCOL_ERROR)

    def stream_failed(self, stream: MessageStream | None, event: StreamFailed) -> None:
        if event.reset_by_peer:
            self.resets += 1

    def connection_lost(self, exc: ConnectionLost) -> None:
        pass


async def device(pki, controller, device_id: str) -> tuple[Connection, MessageStream]:
    ident = pki.device("acme", device_id)
    conf = configuration(pki.dir, ident / "cert.pem", ident / "key.pem")
    conn = await open_connection(controller.quic_port, conf)
    ack = await say_hello(conn, device_id)
    assert isinstance(ack, m.HelloAck), ack
    control = next(s for s in conn.streams.values() if s.kind and s.kind.value == "control")
    return conn, control


async def answers(control: MessageStream, n: int) -> None:
    control.send(m.Ping(n=n))
    with anyio.fail_after(5):
        assert await control.receive() == m.Pong(n=n)


async def settle(pid: int, limit: int) -> int:
    """Resident memory once it is under ``limit`` (the collector policy sweeps after mass
    disconnects), or what it is after 20 s."""
    for _ in range(200):
        now = rss(pid)
        if now < limit:
            return now
        await anyio.sleep(0.1)
    return rss(pid)


async def test_thirty_thousand_bad_streams(pki, controller):
    pid = controller.proc.pid
    bystander, by_control = await device(pki, controller, "press-02")
    before = controller.device(pki.token("acme"), "press-02")
    baseline = rss(pid)
    sent = cut = 0
    while sent < STREAMS:
        conn, _ = await device(pki, controller, "press-01")
        handler = conn.handler = Counting()
        mine = 0
        with anyio.fail_after(30):
            while conn.closed is None and sent < STREAMS:
                while mine - handler.resets < WINDOW and sent < STREAMS:
                    sid = conn.quic.get_next_available_stream_id()
                    conn.quic.send_stream_data(sid, BAD)
                    mine += 1
                    sent += 1
                conn.transmit()
                await asyncio.sleep(0.002)
            while conn.closed is None and handler.resets < mine:  # the last, under the cap
                await asyncio.sleep(0.01)
        if conn.closed is None:
            assert mine <= DEFAULT_MAX_FAILED_TOTAL, "over the cap, yet not cut off"
            conn.close()
        else:
            assert conn.closed.code == ErrorCode.STREAM_LIMIT, conn.closed
            assert mine > DEFAULT_MAX_FAILED_TOTAL  # not before the cap
            cut += 1
        conn._test_transport.close()
        await answers(by_control, sent)  # the other device is served all along
    assert cut >= STREAMS // (DEFAULT_MAX_FAILED_TOTAL + WINDOW + 1)

    grown = await settle(pid, baseline + 20 * MIB) - baseline
    assert grown < 20 * MIB, f"controller grew by {grown / MIB:.1f} MiB"
    # the bystander kept its one connection and session
    assert bystander.closed is None
    await answers(by_control, 0)
    after = controller.device(pki.token("acme"), "press-02")
    assert after["connected"] and after["connection_count"] == before["connection_count"] == 1
    log = controller.log()
    named = [
        ln for ln in log.splitlines() if "event=connection-bounds" in ln and "device=press-01" in ln
    ]
    assert len(named) >= cut and "streams failed on this connection" in named[0]
    bystander.close()
    bystander._test_transport.close()


async def test_unfinished_big_frames_hit_the_buffer_budget(pki, controller):
    pid = controller.proc.pid
    bystander, by_control = await device(pki, controller, "press-02")
    conn, _ = await device(pki, controller, "press-01")
    baseline = rss(pid)
    chunk = b"\x00" * (64 * 1024)
    streams = 0
    with anyio.fail_after(30):
        for _ in range(150):
            if conn.closed is not None:
                break
            sid = conn.quic.get_next_available_stream_id()
            conn.quic.send_stream_data(sid, struct.pack(">I", DEFAULT_MAX_FRAME))
            streams += 1
            for _ in range(15):  # 960 KiB of the announced 1 MiB: never finished
                if conn.closed is not None:
                    break
                conn.quic.send_stream_data(sid, chunk)
                conn.transmit()
                await asyncio.sleep(0.005)
        lost = await conn.wait_closed()
    assert lost.code == ErrorCode.BUFFER_LIMIT, lost
    assert lost.by_peer and "budget" in lost.reason
    assert streams <= 20, f"{streams} streams of unfinished frames before the cut"
    conn._test_transport.close()
    grown = await settle(pid, baseline + 10 * MIB) - baseline
    assert grown < 10 * MIB, f"controller grew by {grown / MIB:.1f} MiB"
    await answers(by_control, 1)
    assert "device=press-01" in controller.log()
    bystander.close()
    bystander._test_transport.close()


def live(*names: str) -> dict[str, int]:
    gc.collect()
    found: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in names:
            found[name] = found.get(name, 0) + 1
    return found


async def test_closed_connections_leave_no_object_behind(pki, tmp_path):
    """In-process (the only way to look at the objects): after abusive connections were cut
    and a normal one closed, no connection, session, core or aioquic state is left."""
    from controller.config import ControllerConfig
    from controller.service import Controller as Service

    kinds = ("Connection", "ControllerSession", "ChannelCore", "MutualTlsServerConnection")
    cfg = ControllerConfig(
        certs=pki.dir, data=tmp_path / "data", listen_port=0, api_port=0, handshake_timeout=1.0
    )
    service = Service(cfg)
    ident = pki.device("acme", "press-01")
    conf = configuration(pki.dir, ident / "cert.pem", ident / "key.pem")
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        assert live(*kinds) == {}
        for abusive in (True, True, False):
            conn = await open_connection(service.quic_port, conf)
            await say_hello(conn, "press-01")
            handler = conn.handler = Counting()
            mine = 0
            with anyio.fail_after(20):
                while abusive and conn.closed is None:
                    while mine - handler.resets < WINDOW:
                        conn.quic.send_stream_data(conn.quic.get_next_available_stream_id(), BAD)
                        mine += 1
                    conn.transmit()
                    await asyncio.sleep(0.002)
            if abusive:
                assert conn.closed.code == ErrorCode.STREAM_LIMIT
            else:
                conn.close()
            conn._test_transport.close()
        del conn, handler
        with anyio.fail_after(15):  # closing connections drain for 3 PTO, then are forgotten
            while left := live(*kinds):
                await anyio.sleep(0.2)
        assert left == {}
        service.shutdown()
