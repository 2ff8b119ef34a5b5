"""The receive credit slides over the delivered bytes (mtls_hook.SlidingMaxData): a peer that
leaves a gap in a stream makes aioquic hold at most one window (the configuration's max_data)
undelivered, where plain aioquic keeps doubling its credit and buffers everything sent.

Sans-IO: a real client and a real controller connection (real certificates, the production
configurations) with their datagrams pumped between them in memory. The hostile sender is a
real aioquic connection that withholds the first bytes of its streams (it never sends offset
0) until the test releases them: a datagram merely held back would be declared lost by the
sender's loss detection once later packets are acknowledged, and resent.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived

from margo_stream.transport.mtls_hook import (
    MutualTlsServerConnection,
    SlidingMaxData,
    bound_receive_credit,
    connection_undelivered_bytes,
)
from tests.harness import Pki

MIB = 1 << 20
WINDOW = 4 * MIB  # server_configuration's max_data
GAP = 1000  # the bytes at the start of a stream the hostile sender withholds
# the credit logic does not depend on the datagram size; 16 kB datagrams move the tens of MiB
# these tests need eight times faster than the production 1350 bytes (one test runs those)
DATAGRAM = 16_000
SLACK = 4 * DATAGRAM  # a few packets
QUIET_ROUNDS = 40  # rounds of 1 ms with no datagram: past the 25 ms ACK delay
CLIENT_ADDR, SERVER_ADDR = ("127.0.0.1", 1234), ("127.0.0.1", 4433)


def _configurations(pki: Pki, datagram: int) -> tuple[QuicConfiguration, QuicConfiguration]:
    client, server = pki.quic_configurations(max_datagram_size=datagram)
    assert server.max_data == client.max_data == WINDOW
    return client, server


def _pair(
    pki: Pki, *, bounded: bool, datagram: int = DATAGRAM
) -> tuple[QuicConnection, QuicConnection]:
    client_conf, server_conf = _configurations(pki, datagram)
    client = QuicConnection(configuration=client_conf)
    odcid = client._peer_cid.cid  # test-only peek: the client's initial destination id
    server = (
        MutualTlsServerConnection(
            configuration=server_conf, original_destination_connection_id=odcid
        )
        if bounded
        else QuicConnection(configuration=server_conf, original_destination_connection_id=odcid)
    )
    return client, server


@dataclass
class Pump:
    """Moves datagrams between a sending and a receiving connection in simulated time; the
    receiver's application reads every event at once. Only the receiver's timers run."""

    sender: QuicConnection
    receiver: QuicConnection
    sender_addr: tuple[str, int] = CLIENT_ADDR  # where each side's datagrams come from
    receiver_addr: tuple[str, int] = SERVER_ADDR
    now: float = 1.0
    rounds: int = 0
    received: dict[int, int] = field(default_factory=dict)  # stream -> bytes delivered
    digests: dict[int, hashlib._Hash] = field(default_factory=dict)
    withheld: dict[int, int] = field(default_factory=dict)  # stream -> bytes held back
    most_undelivered: int = 0

    def handshake(self, client: QuicConnection) -> None:
        client.connect(SERVER_ADDR, now=self.now)
        server = self.receiver if client is self.sender else self.sender
        self._move(client, server, CLIENT_ADDR)  # the server has no path before this one
        self.run()
        assert self.sender._handshake_complete and self.receiver._handshake_complete

    def send(self, stream_id: int, data: bytes, *, withhold: int = 0) -> None:
        self.sender.send_stream_data(stream_id, data, end_stream=True)
        if withhold:  # a hostile peer: the first bytes are never sent (test-only peek)
            self.sender._streams[stream_id].sender._pending.subtract(0, withhold)
            self.withheld[stream_id] = withhold

    def release(self) -> None:
        for stream_id, size in self.withheld.items():
            sender = self.sender._streams[stream_id].sender  # test-only peek
            sender._pending.add(0, size)
            sender.buffer_is_empty = False
        self.withheld.clear()

    def undelivered(self) -> int:
        """Bytes the sender put on the wire that the receiver's application has not had: the
        sender's own count (highest offsets sent, less the withheld bytes below them)."""
        on_wire = sum(s.sender.highest_offset for s in self.sender._streams.values())
        return on_wire - sum(self.withheld.values()) - sum(self.received.values())

    def run(self, max_rounds: int = 200_000) -> None:
        """Pump until nothing has moved for QUIET_ROUNDS rounds (or ``max_rounds``)."""
        quiet = 0
        while quiet < QUIET_ROUNDS and self.rounds < max_rounds:
            self.rounds += 1
            self.now += 0.001
            moved = self._move(self.sender, self.receiver, self.sender_addr)
            self._deliver()
            timer = self.receiver.get_timer()
            if timer is not None and timer <= self.now:
                self.receiver.handle_timer(now=self.now)
            moved += self._move(self.receiver, self.sender, self.receiver_addr)
            while self.sender.next_event() is not None:
                pass
            quiet = 0 if moved else quiet + 1
            self.most_undelivered = max(self.most_undelivered, self.undelivered())

    def _move(self, source: QuicConnection, sink: QuicConnection, addr: tuple) -> int:
        datagrams = source.datagrams_to_send(now=self.now)
        for data, _ in datagrams:
            sink.receive_datagram(data, addr, now=self.now)
        return len(datagrams)

    def _deliver(self) -> None:
        while (event := self.receiver.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                sid = event.stream_id
                self.received[sid] = self.received.get(sid, 0) + len(event.data)
                self.digests.setdefault(sid, hashlib.sha256()).update(event.data)


def _payloads(streams: int, total: int) -> dict[int, bytes]:
    rng = random.Random(14)
    return {4 * i: rng.randbytes(total // streams) for i in range(streams)}  # client bidi ids


def _gapped_transfer(
    pki: Pki, payloads: dict[int, bytes], *, bounded: bool, datagram: int = DATAGRAM
) -> Pump:
    """Every stream sent whole but for its first GAP bytes, pumped until the sender stops."""
    client, server = _pair(pki, bounded=bounded, datagram=datagram)
    pump = Pump(client, server)
    pump.handshake(client)
    for stream_id, data in payloads.items():
        pump.send(stream_id, data, withhold=GAP)
    pump.run()
    return pump


def _assert_intact(pump: Pump, payloads: dict[int, bytes]) -> None:
    assert pump.received == {sid: len(data) for sid, data in payloads.items()}
    for sid, data in payloads.items():
        assert pump.digests[sid].digest() == hashlib.sha256(data).digest(), f"stream {sid}"


def test_plain_aioquic_buffers_everything_a_gapped_stream_sends(tmp_path):
    """The control: without the hook the credit doubles from the highest offsets received, so
    the stalled stream's whole 32 MiB ends up in aioquic's receive buffer."""
    pump = _gapped_transfer(Pki(tmp_path), _payloads(1, 32 * MIB), bounded=False)
    assert pump.received == {}  # nothing delivered: offset 0 never came
    assert pump.undelivered() > 30 * MIB  # far past one window
    assert connection_undelivered_bytes(pump.receiver) > 30 * MIB


@pytest.mark.parametrize(("datagram", "total"), [(DATAGRAM, 64 * MIB), (1350, 8 * MIB)])
def test_a_gap_holds_at_most_one_window_undelivered_and_the_window_slides_after_it(
    tmp_path, datagram, total
):
    payloads = _payloads(1, total)
    pump = _gapped_transfer(Pki(tmp_path), payloads, bounded=True, datagram=datagram)
    assert pump.received == {}
    assert WINDOW - SLACK < pump.undelivered() <= pump.most_undelivered <= WINDOW + SLACK
    assert connection_undelivered_bytes(pump.receiver) <= WINDOW
    pump.release()  # the gap is filled: everything flows, nothing stalls
    pump.run()
    _assert_intact(pump, payloads)
    assert pump.most_undelivered <= WINDOW + SLACK
    assert connection_undelivered_bytes(pump.receiver) == 0
    assert pump.receiver._local_max_data.value >= total  # the credit slid along (test peek)


def test_gaps_in_many_streams_share_the_one_window(tmp_path):
    """Per-stream credit keeps doubling; the connection credit bounds the streams' sum."""
    pki = Pki(tmp_path)
    payloads = _payloads(8, 16 * MIB)
    plain = _gapped_transfer(pki, payloads, bounded=False)
    assert plain.undelivered() > 15 * MIB  # the control: every stream buffered in full
    pump = _gapped_transfer(pki, payloads, bounded=True)
    assert WINDOW - SLACK < pump.most_undelivered <= WINDOW + SLACK
    pump.release()
    pump.run()
    _assert_intact(pump, payloads)


def test_an_ungapped_transfer_runs_as_fast_as_on_plain_aioquic(tmp_path):
    """Simulated time, so no wall clock: the sliding credit costs the transfer no more rounds
    than aioquic's doubling credit, and its MAX_DATA frames stay batched (one per half
    window)."""
    pki = Pki(tmp_path)
    total = 16 * MIB
    payloads = _payloads(1, total)
    rounds, frames = {}, {}
    for bounded in (False, True):
        client, server = _pair(pki, bounded=bounded)
        pump = Pump(client, server)
        pump.handshake(client)
        frames[bounded] = _count_max_data_frames(server)
        start = pump.rounds
        pump.send(0, payloads[0])
        pump.run()
        _assert_intact(pump, payloads)
        rounds[bounded] = pump.rounds - start
    assert rounds[True] <= rounds[False] * 1.1 + QUIET_ROUNDS, rounds
    assert 0 < len(frames[False]) <= len(frames[True]) <= total // (WINDOW // 2) + 1, frames
    steps = [b - a for a, b in itertools.pairwise(frames[True])]
    assert min(steps) >= WINDOW // 2, frames
    assert isinstance(server._local_max_data, SlidingMaxData)  # the bounded one ran last


def _count_max_data_frames(connection: QuicConnection) -> list[int]:
    """The MAX_DATA values ``connection`` sends from now on (a test-only wrap)."""
    values: list[int] = []
    write = connection._write_connection_limits

    def counting(builder, space) -> None:
        before = connection._local_max_data.sent
        write(builder, space)
        if connection._local_max_data.sent != before:
            values.append(connection._local_max_data.sent)

    connection._write_connection_limits = counting
    return values


def test_an_agent_connection_is_bounded_the_same_way_against_a_hostile_controller(tmp_path):
    """``bound_receive_credit`` on a client connection: what quic_client.connect should call."""
    client, server = _pair(Pki(tmp_path), bounded=False)
    bound_receive_credit(client)
    pump = Pump(server, client, SERVER_ADDR, CLIENT_ADDR)  # the controller sends to the agent
    pump.handshake(client)
    payloads = {1: _payloads(1, 12 * MIB)[0]}  # a server-initiated bidirectional stream
    pump.send(1, payloads[1], withhold=GAP)
    pump.run()
    assert pump.received == {}
    assert WINDOW - SLACK < pump.most_undelivered <= WINDOW + SLACK
    pump.release()
    pump.run()
    _assert_intact(pump, payloads)


def test_check_aioquic_fails_loudly_when_the_receive_credit_internals_move(monkeypatch):
    from aioquic.quic.connection import Limit

    from margo_stream.transport.mtls_hook import UnsupportedAioquic, check_aioquic

    check_aioquic()
    monkeypatch.setattr(QuicConnection, "_write_connection_limits", lambda self, b, s: None)
    with pytest.raises(UnsupportedAioquic, match="raised differently; the receive credit"):
        check_aioquic()
    monkeypatch.undo()
    limit_init = Limit.__init__

    def with_another_attribute(self, *args, **kwargs) -> None:
        limit_init(self, *args, **kwargs)
        self.pending = 0

    monkeypatch.setattr(Limit, "__init__", with_another_attribute)
    with pytest.raises(UnsupportedAioquic, match="_local_max_data is not a Limit with exactly"):
        check_aioquic()
    monkeypatch.undo()
    monkeypatch.setattr("aioquic.quic.stream.QuicStreamReceiver.__init__", lambda *a: None)
    with pytest.raises(UnsupportedAioquic, match="QuicStreamReceiver has no _buffer"):
        check_aioquic()
