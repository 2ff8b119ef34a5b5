"""Two QUIC connection objects on one event loop, their datagrams handed over in memory, and
the send and receipt times of each side's datagrams (the ACK tests of both stacks)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


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
