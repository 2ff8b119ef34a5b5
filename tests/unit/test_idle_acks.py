"""An idle agent only pings, and the controller only acknowledges: its answers elicit no ACK,
so aioquic would keep every one of them (about 800 bytes a keepalive, without end). Once
``ELICIT_AFTER`` of them wait, the controller's answer carries a PING, the agent's ACK of it
lets them all go (mtls_hook, point 11), at the cost of one agent datagram per
``ELICIT_AFTER`` pings. On both agent stacks, against the real controller ``Connection``, their
datagrams handed over in memory and counted."""

from __future__ import annotations

import asyncio

import pytest

from margo_stream.transport.connection import ELICIT_AFTER
from margo_stream.transport.mtls_hook import pure_acks_unacknowledged
from tests.harness import Pki
from tests.memory_wire import close_pair, connect_pair

PINGS = 60


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("stack", ["aioquic", "qh3"])
async def test_an_idle_agents_pings_leave_no_answers_behind(
    pki: Pki, anyio_backend: str, stack: str
) -> None:
    agent, controller, wire = await connect_pair(pki, stack)
    sent = wire.sent
    before = {side: len(times) for side, times in sent.items()}
    waiting = []
    for _ in range(PINGS):
        agent.ping()
        await asyncio.sleep(0.01)  # past the agent's ACK hold: its ACK leaves on its own
        waiting.append(pure_acks_unacknowledged(controller.quic))
    assert max(waiting) <= ELICIT_AFTER, waiting  # bounded; without the PING: 1, 2, ... 60
    agent_datagrams = len(sent["agent"]) - before["agent"]
    controller_datagrams = len(sent["controller"]) - before["controller"]
    assert controller_datagrams == PINGS  # one answer a ping, the PING riding in some
    # one ping each, and one ACK each time the answer asked for one
    assert PINGS < agent_datagrams <= PINGS + PINGS // ELICIT_AFTER + 1, agent_datagrams
    close_pair(agent, controller)
