"""ACKs ride with the reply (mtls_hook.hold_acks / ack_due_now, wired in ``Connection``): a
message answered within the hold costs its sender one datagram back (the answer carrying the
ACK), not two; one answered later gets its ACK alone once the hold is over; a packet that
brought no stream data (a keepalive PING) is acknowledged in the loop turn that received it.

Two real ``Connection`` objects (real certificates, the production configurations) on one
event loop, their datagrams handed over in memory and counted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aioquic import tls

from margo_stream.protocol import messages as m
from margo_stream.transport.connection import ACK_EVERY, MessageStream
from margo_stream.transport.mtls_hook import ACK_HOLD
from tests.harness import Pki
from tests.memory_wire import answer_times, close_pair, connect_pair


class Answering:
    """The controller's handler: answers each status with its ack after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.opened: list[MessageStream] = []

    def stream_opened(self, stream: MessageStream, first: Any) -> None:
        self.opened.append(stream)

        def on_message(message: Any) -> None:
            loop = asyncio.get_running_loop()
            loop.call_later(self.delay, lambda: stream.send(m.StatusAck(seq=message.seq)))

        stream.on_message = on_message

    def stream_failed(self, stream: Any, event: Any) -> None:
        pass

    def connection_lost(self, exc: Any) -> None:
        pass


async def _status_exchange(pki: Pki, delay: float) -> list[float]:
    """Times (after the status left) at which the controller sent datagrams, until quiet."""
    agent, controller, wire = await connect_pair(
        pki, "aioquic", controller_handler=Answering(delay)
    )
    status = m.Status(seq=1, deployment_id="d1", manifest_version=1, state="installed")
    got, times = await answer_times(wire, agent.open_stream(), status, "controller")
    assert isinstance(got, m.StatusAck) and got.seq == 1
    close_pair(agent, controller)
    return times


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_answer_within_the_hold_carries_the_ack(pki: Pki, anyio_backend: str) -> None:
    times = await _status_exchange(pki, delay=0.001)
    assert len(times) == 1, times  # the ack and the ACK in one datagram


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_late_answer_leaves_after_an_ack_of_its_own(pki: Pki, anyio_backend: str) -> None:
    times = await _status_exchange(pki, delay=0.03)
    assert len(times) == 2, times
    assert times[0] >= ACK_HOLD * 0.9 and times[0] < 0.025  # the ACK, once the hold was over
    assert times[1] >= 0.03  # then the answer


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_ping_is_acknowledged_in_the_turn_that_received_it(
    pki: Pki, anyio_backend: str
) -> None:
    agent, controller, wire = await connect_pair(pki, "aioquic", controller_handler=Answering(0.0))
    sent, received = wire.sent, wire.received["controller"]
    before, got_before = len(sent["controller"]), len(received)
    agent.ping()
    await asyncio.sleep(0.05)
    received = received[got_before:]
    assert len(received) == 1
    times = [t - received[0] for t in sent["controller"][before:]]
    # a held ACK would leave ACK_HOLD after the receipt; one sent in the same turn leaves at
    # once (the margin is for a busy machine preempting the process)
    assert len(times) == 1 and times[0] < ACK_HOLD * 0.8, times
    close_pair(agent, controller)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_flow_of_data_is_acknowledged_every_few_packets(
    pki: Pki, anyio_backend: str
) -> None:
    """Nothing to answer (a bulk transfer's receiver): the ACKs may not wait for the hold, or
    the sender's window would move once per 5 ms."""
    agent, controller, wire = await connect_pair(
        pki, "aioquic", controller_handler=Answering(60.0), spacing=0.0005
    )
    due_after: list[bool] = []  # per datagram the controller received: an ACK due at once?
    receive = controller.datagram_received

    def watched(data: bytes, addr: Any) -> None:
        receive(data, addr)
        ack_at = controller.quic._spaces[tls.Epoch.ONE_RTT].ack_at  # test-only peek
        due_after.append(ack_at is not None and ack_at <= controller.loop.time())

    controller.datagram_received = watched  # type: ignore[method-assign]
    stream = agent.open_stream()
    for seq in range(1, 401):  # nothing answers these in time
        stream.send(
            m.Status(seq=seq, deployment_id=f"d{seq:0>40}", manifest_version=1, state="installed")
        )
    await asyncio.sleep(0.1)
    assert len(due_after) >= 30
    # the first packets wait for a reply; the ACK_EVERY-th makes the ACK due without the timer
    assert due_after[: ACK_EVERY - 1] == [False] * (ACK_EVERY - 1), due_after
    assert due_after[ACK_EVERY - 1], due_after
    assert sum(due_after) >= len(due_after) // (2 * ACK_EVERY), due_after
    close_pair(agent, controller)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_gap_in_the_packet_numbers_is_acknowledged_at_once(
    pki: Pki, anyio_backend: str
) -> None:
    """A packet lost on the way: the next one opens a gap, which the receiver acknowledges in
    the turn that received it (RFC 9000 13.2.1), so the sender learns of the loss without
    waiting for the hold; the packet after that, in order again, waits for a reply. (Data of
    the stream that lost a packet is not delivered past the hole, which alone makes an ACK
    due: the packets here carry other streams' data.)"""
    agent, controller, _ = await connect_pair(pki, "aioquic", controller_handler=Answering(60.0))
    lost: list[bytes] = []
    due_after: list[bool] = []  # per datagram the controller received: an ACK due at once?
    receive = controller.datagram_received

    def lossy(data: bytes, addr: Any) -> None:
        if not lost:
            lost.append(data)  # the network drops the first
            return
        receive(data, addr)
        ack_at = controller.quic._spaces[tls.Epoch.ONE_RTT].ack_at  # test-only peek
        due_after.append(ack_at is not None and ack_at <= controller.loop.time())

    controller.datagram_received = lossy  # type: ignore[method-assign]
    # three streams, a datagram each: what follows the lost one is data the controller can
    # deliver (another stream's), so only the gap says that an ACK is due
    for seq in (1, 2, 3):
        stream = agent.open_stream()
        stream.send(m.Status(seq=seq, deployment_id="d1", manifest_version=1, state="installed"))
        agent.transmit()
        await asyncio.sleep(0.002)
    assert len(lost) == 1
    assert due_after[:2] == [True, False], due_after
    close_pair(agent, controller)
