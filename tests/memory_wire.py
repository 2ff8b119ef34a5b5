"""Two QUIC connection objects on one event loop, their datagrams handed over in memory, and
the send and receipt times of each side's datagrams (the ACK tests of both stacks)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aioquic.quic.connection import QuicConnection

from margo_stream.protocol.codes import Sender
from margo_stream.transport.connection import Connection
from margo_stream.transport.mtls_hook import MutualTlsServerConnection
from margo_stream.transport.qh3_connection import (
    Qh3Connection,
    Qh3QuicConnection,
    qh3_configuration,
)

if TYPE_CHECKING:
    from tests.harness import Pki

AGENT_ADDR, CONTROLLER_ADDR = ("127.0.0.1", 1234), ("127.0.0.1", 4433)


class MemoryWire:
    """``sender(who, peer, source)`` is ``who``'s ``sendto``: it records the time in
    ``sent[who]`` and delivers to ``conns[peer].datagram_received`` from ``source``, in the next
    loop turn, or ``spacing`` seconds apart for the agent's datagrams (a slow link); the time of
    each delivery goes in ``received[peer]``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, spacing: float = 0.0) -> None:
        self.loop = loop
        self.spacing = spacing
        self.conns: dict[str, Any] = {}
        self.sent: dict[str, list[float]] = {"agent": [], "controller": []}
        self.received: dict[str, list[float]] = {"agent": [], "controller": []}
        self._free_at = 0.0  # when the agent's link is free again

    def sender(self, who: str, peer: str, source: tuple[str, int]) -> Callable[[bytes, Any], None]:
        def sendto(data: bytes, _addr: Any) -> None:
            now = self.loop.time()
            self.sent[who].append(now)
            receiver = self.conns[peer]

            def deliver() -> None:
                self.received[peer].append(self.loop.time())
                receiver.datagram_received(data, source)

            if who == "agent" and self.spacing:
                self._free_at = max(self._free_at, now) + self.spacing
                self.loop.call_at(self._free_at, deliver)
            else:
                self.loop.call_soon(deliver)

        return sendto

    async def handshake(self, agent: Any, controller: Any) -> None:
        """Wire ``agent`` (a client whose ``quic`` has not connected yet) to ``controller``,
        connect, and return once the handshake's last flights and their ACKs are over."""
        self.conns["agent"], self.conns["controller"] = agent, controller
        agent.quic.connect(("127.0.0.1", 4433), now=self.loop.time())
        agent.transmit()
        await asyncio.wait_for(agent.wait_handshake(), 5)
        await asyncio.sleep(0.05)


async def connect_pair(
    pki: Pki,
    stack: str,
    *,
    agent_handler: Any = None,
    controller_handler: Any = None,
    spacing: float = 0.0,
) -> tuple[Any, Connection, MemoryWire]:
    """A real agent connection of device acme/press-01 on ``stack`` (``aioquic``: the
    production client configuration; ``qh3``: the agent's qh3 configuration) and the real
    controller ``Connection`` (aioquic with the client-certificate hook), over a
    ``MemoryWire`` (``spacing``: seconds between the agent's datagrams on the way), past their
    handshake."""
    loop = asyncio.get_running_loop()
    client_conf, server_conf = pki.quic_configurations()
    client: Any
    if stack == "qh3":
        ident = pki.device("acme", "press-01")
        client = Qh3QuicConnection(
            configuration=qh3_configuration(
                str(ident / "cert.pem"),
                str(ident / "key.pem"),
                str(pki.dir / "controller/ca.pem"),
                server_name="localhost",
            )
        )
        original_cid = client.original_destination_connection_id
    else:
        client = QuicConnection(configuration=client_conf)
        original_cid = client._peer_cid.cid  # test-only peek
    server = MutualTlsServerConnection(
        configuration=server_conf, original_destination_connection_id=original_cid
    )
    wire = MemoryWire(loop, spacing)
    carrier = Qh3Connection if stack == "qh3" else Connection
    agent = carrier(client, Sender.AGENT, wire.sender("agent", "controller", AGENT_ADDR), loop)
    controller = Connection(
        server, Sender.CONTROLLER, wire.sender("controller", "agent", CONTROLLER_ADDR), loop
    )
    if agent_handler is not None:
        agent.handler = agent_handler
    if controller_handler is not None:
        controller.handler = controller_handler
    await wire.handshake(agent, controller)
    return agent, controller, wire


async def answer_times(
    wire: MemoryWire, stream: Any, message: Any, answerer: str, *, end: bool = False
) -> tuple[Any, list[float]]:
    """Send ``message`` on ``stream`` and await the answer: the answer, and the times (after
    the send) at which ``answerer`` (``agent`` or ``controller``) sent datagrams, until 50 ms
    of quiet after the answer."""
    sent = wire.sent[answerer]
    before = len(sent)
    t0 = wire.loop.time()
    stream.send(message, end=end)
    got = await asyncio.wait_for(stream.receive(), 5)
    await asyncio.sleep(0.05)
    return got, [t - t0 for t in sent[before:]]


def close_pair(agent: Any, controller: Connection) -> None:
    """End a ``connect_pair``: the agent closes, and neither side's timer is left behind."""
    agent.close(0, "done")
    controller.cancel_timer()
    agent.cancel_timer()
