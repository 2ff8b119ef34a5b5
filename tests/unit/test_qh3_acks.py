"""The qh3 stack's ACKs (``Qh3Connection``): qh3's core acknowledges a packet that ends a
stream at once, and every push ends its stream; held up to ``ACK_HOLD``, the push's ACK rides
with the answer (one datagram back, and no path-MTU probe after it), and an answer later than
the hold leaves after an ACK of its own. A flow of data is acknowledged every ``ACK_EVERY`` datagrams without the hold.

A real qh3 agent connection (the device's certificate, the agent's qh3 configuration) and the
real controller ``Connection`` (aioquic with the client-certificate hook) on one event loop,
their datagrams handed over in memory and counted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from margo_stream.protocol import messages as m
from margo_stream.transport.connection import MessageStream
from margo_stream.transport.qh3_connection import (
    ACK_EVERY,
    ACK_HOLD,
)
from tests.harness import Pki
from tests.memory_wire import answer_times, close_pair, connect_pair


class Answering:
    """The agent's handler: answers each push with its result after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def stream_opened(self, stream: MessageStream, first: Any) -> None:
        loop = asyncio.get_running_loop()
        version = first.version
        loop.call_later(
            self.delay, lambda: stream.send(m.DesiredResult(version=version, ok=True), end=True)
        )

    def stream_failed(self, stream: Any, event: Any) -> None:
        pass

    def connection_lost(self, exc: Any) -> None:
        pass


async def _push(pki: Pki, delay: float) -> list[float]:
    """Times (after the push left) at which the agent sent datagrams, until quiet."""
    agent, controller, wire = await connect_pair(pki, "qh3", agent_handler=Answering(delay))
    desired = m.Desired(version=7, manifest=b"{}", signature=b"s" * 64)
    got, times = await answer_times(wire, controller.open_stream(), desired, "agent", end=True)
    assert isinstance(got, m.DesiredResult) and got.version == 7
    close_pair(agent, controller)
    return times


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_answer_within_the_hold_carries_the_pushs_ack(
    pki: Pki, anyio_backend: str
) -> None:
    times = await _push(pki, delay=0.001)
    # one datagram: the answer with the push's ACK (no ACK of its own first, no path-MTU
    # probe; the credit for the closed stream waits for the next packet sent anyway)
    assert len(times) == 1 and 0.001 <= times[0] < ACK_HOLD * 0.9, times


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_late_answer_leaves_after_an_ack_of_its_own(pki: Pki, anyio_backend: str) -> None:
    times = await _push(pki, delay=0.03)
    early = [t for t in times if t < 0.03]
    assert len(early) == 1 and ACK_HOLD * 0.9 <= early[0] < 0.025, times  # the ACK, held
    assert any(t >= 0.03 for t in times), times  # then the answer


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_flow_of_data_is_acknowledged_without_the_hold(
    pki: Pki, anyio_backend: str
) -> None:
    agent, controller, wire = await connect_pair(pki, "qh3", agent_handler=Answering(60.0))
    sent = wire.sent
    got_before = len(wire.received["agent"])
    before = len(sent["agent"])
    stream = controller.open_stream()
    blob = b"b" * 60_000  # about 45 datagrams, nothing answered in time
    stream.send(m.Desired(version=8, manifest=blob, signature=b"s" * 64))
    await asyncio.sleep(0.1)
    received = wire.received["agent"][got_before:]
    assert len(received) >= 4 * ACK_EVERY, len(received)
    acks = sent["agent"][before:]
    assert len(acks) >= 2, (len(acks), len(received))
    # the ACK_EVERY-th datagram made an ACK due in its own loop turn, not at the hold (how many
    # ACKs follow depends on how many datagrams a turn delivers, which a busy machine changes)
    first_ack = acks[0] - received[0]
    assert first_ack < ACK_HOLD * 0.9, first_ack
    close_pair(agent, controller)
