"""Builds skipped when nothing can be built (mtls_hook.nothing_to_send, count_losses, wired in
``Connection.datagram_received``).

The predicate must be sound: whenever it says nothing can be sent (after a datagram that
brought no stream data and declared nothing lost), aioquic's own ``datagrams_to_send`` must
indeed build nothing. Checked here on two real aioquic connections (the production
configurations, real certificates) exchanging streams both ways over a lossy, reordering,
delaying link on a simulated clock, with timers and a congestion window that fills: a skip
that would strand data (a freed window, a declared loss, a lost MAX_DATA) shows up as a build
that sends something where the predicate said nothing.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection

from margo_stream.protocol import messages as m
from margo_stream.transport.mtls_hook import (
    MutualTlsServerConnection,
    count_losses,
    hold_acks,
    nothing_to_send,
    use_own_pacer,
)
from tests.harness import Pki
from tests.memory_wire import close_pair, connect_pair
from tests.unit.test_ack_with_reply import Answering

CLIENT, SERVER = ("127.0.0.1", 1234), ("127.0.0.1", 4433)


class End:
    """One side of the sans-IO exchange: its connection, its losses, its verdicts."""

    def __init__(self, quic: QuicConnection) -> None:
        self.quic = quic
        use_own_pacer(quic)  # as ``Connection`` does
        self.losses = 0
        count_losses(quic, self._lost)
        self.skips = 0  # receipts after which the predicate said "nothing to send"
        self.confirmed = 0  # of those, ones where a real build then built nothing

    def _lost(self) -> None:
        self.losses += 1

    def receive(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        losses = self.losses
        self.quic.receive_datagram(data, addr, now=now)
        data_in = False
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, qe.StreamDataReceived) and (event.data or event.end_stream):
                data_in = True
            if isinstance(event, qe.HandshakeCompleted):
                hold_acks(self.quic)
        if not data_in and losses == self.losses and nothing_to_send(self.quic, now):
            self.skips += 1
            built = self.quic.datagrams_to_send(now=now)
            assert built == [], (
                f"nothing_to_send said nothing, aioquic built {len(built)} datagram(s)"
            )
            self.confirmed += 1


def _exchange(pki: Pki, seed: int, steps: int) -> tuple[End, End, int]:
    rng = random.Random(seed)
    client_conf, server_conf = pki.quic_configurations()
    client = End(QuicConnection(configuration=client_conf))
    server = End(
        MutualTlsServerConnection(
            configuration=server_conf,
            original_destination_connection_id=client.quic._peer_cid.cid,  # test-only peek
        )
    )
    now = 1.0
    client.quic.connect(SERVER, now=now)
    # (delivery time, order, receiving end, data, source address)
    wire: list[tuple[float, int, End, bytes, tuple[str, int]]] = []
    order = 0
    dropped = 0
    streams: dict[End, list[int]] = {client: [], server: []}
    for _ in range(steps):
        for end, peer, source in ((client, server, CLIENT), (server, client, SERVER)):
            if end.quic._handshake_confirmed and rng.random() < 0.04:
                # more data: on an open stream, or on a new one (at most 8 open a side)
                size = rng.choice((10, 10, 100, 300, 1500, 6000, 30000))
                fin = rng.random() < 0.3
                if streams[end] and (len(streams[end]) >= 8 or rng.random() < 0.6):
                    sid = rng.choice(streams[end])
                else:
                    sid = end.quic.get_next_available_stream_id()
                    streams[end].append(sid)
                end.quic.send_stream_data(sid, b"x" * size, end_stream=fin)
                if fin:
                    streams[end].remove(sid)
            if not end.quic._network_paths:
                continue  # a server that has heard nothing yet
            for data, _addr in end.quic.datagrams_to_send(now=now):
                confirmed = client.quic._handshake_confirmed and server.quic._handshake_confirmed
                if confirmed and rng.random() < 0.12:  # the handshake is not the point here
                    dropped += 1
                    continue
                order += 1
                wire.append((now + rng.uniform(0.002, 0.04), order, peer, data, source))
        # time moves to the next delivery or timer, whichever is first
        wire.sort(key=lambda w: (w[0], w[1]))
        due = [t for t in (client.quic.get_timer(), server.quic.get_timer()) if t is not None]
        due += [wire[0][0]] if wire else []
        now = max(now + 0.0002, min([*due, now + 0.005]))  # 0.2-5 ms: the idle timer is far
        for end in (client, server):
            timer = end.quic.get_timer()
            if timer is not None and timer <= now:
                end.quic.handle_timer(now=now)
                while end.quic.next_event() is not None:
                    pass
        while wire and wire[0][0] <= now:
            _, _, peer, data, source = wire.pop(0)
            peer.receive(data, source, now)
    return client, server, dropped


def test_nothing_to_send_is_never_wrong_on_a_lossy_link(pki: Pki) -> None:
    skips = dropped = losses = 0
    for seed in (1, 2, 3, 4):
        client, server, lost_on_wire = _exchange(pki, seed, steps=3000)
        # every time the predicate said "nothing", a real build agreed (asserted in receive)
        assert client.confirmed == client.skips and server.confirmed == server.skips
        skips += client.skips + server.skips
        dropped += lost_on_wire
        losses += client.losses + server.losses
    assert dropped > 400  # the link lost packets...
    assert losses > 400  # ...the recoveries declared packets lost...
    assert skips > 40  # ...and the predicate still found receipts with nothing to send


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_pure_ack_costs_no_build(pki: Pki, anyio_backend: str) -> None:
    """The controller's ack of a status, acknowledged by the agent's pure ACK: the controller
    reads that ACK and builds nothing (it used to build an empty flight for it)."""
    agent, controller, sent = await connect_pair(pki, "aioquic", controller_handler=Answering(0.0))
    builds: list[int] = []
    build = controller.quic.datagrams_to_send

    def counted(now: float) -> Any:
        out = build(now=now)
        builds.append(len(out))
        return out

    controller.quic.datagrams_to_send = counted  # type: ignore[method-assign]
    received = [0]
    deliver = controller.datagram_received

    def receive(data: bytes, addr: Any) -> None:
        received[0] += 1
        deliver(data, addr)

    controller.datagram_received = receive  # type: ignore[method-assign]
    stream = agent.open_stream()
    for seq in (1, 2, 3):
        stream.send(m.Status(seq=seq, deployment_id="d1", manifest_version=1, state="installed"))
        got = await asyncio.wait_for(stream.receive(), 5)
        assert isinstance(got, m.StatusAck) and got.seq == seq
        await asyncio.sleep(0.03)  # the agent's held ACK of the ack leaves on its own
    assert received[0] >= 6  # three statuses and three pure ACKs
    # one empty build a status (this handler answers a turn after the status came: the
    # receipt's own flight finds nothing yet), none for the three pure ACKs (two each before)
    assert builds.count(0) <= 3 and builds.count(1) == 3, builds
    close_pair(agent, controller)
