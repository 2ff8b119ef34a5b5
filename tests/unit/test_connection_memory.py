"""What an idle server connection keeps after its handshake (mtls_hook, point 8): the three
16 KiB TLS output buffers go, the frame-handler epoch sets are shared, and the connection works
exactly as before (streams both ways, pings, a handshake message after the handshake refused
with unexpected_message rather than an exception).

Sans-IO: a real client and a real controller connection (real certificates, the production
configurations) with their datagrams moved in memory.
"""

from __future__ import annotations

import pytest
from aioquic import tls
from aioquic.quic import events as qe
from aioquic.quic.connection import QuicConnection, QuicConnectionState

from margo_stream.transport import mtls_hook
from margo_stream.transport.mtls_hook import (
    FRAME_HANDLERS,
    HANDSHAKE_EPOCHS,
    MutualTlsServerConnection,
    UnsupportedAioquic,
    check_aioquic,
    peer_certificates,
    release_handshake_buffers,
    take_client_chain,
)
from margo_stream.transport.quic_client import client_configuration
from margo_stream.transport.quic_server import server_configuration
from tests.harness import Pki

CLIENT, SERVER = ("127.0.0.1", 1234), ("127.0.0.1", 4433)


class Pair:
    def __init__(self, pki: Pki) -> None:
        ident = pki.device("acme", "press-01")
        self.client = QuicConnection(
            configuration=client_configuration(
                str(ident / "cert.pem"),
                str(ident / "key.pem"),
                str(pki.dir / "controller/ca.pem"),
                server_name="localhost",
            )
        )
        self.server = MutualTlsServerConnection(
            configuration=server_configuration(
                str(pki.dir / "controller/cert.pem"), str(pki.dir / "controller/key.pem")
            ),
            original_destination_connection_id=self.client._peer_cid.cid,  # test-only peek
        )
        self.now = 1.0
        self.server_events: list[qe.QuicEvent] = []
        self.client_events: list[qe.QuicEvent] = []
        self.client.connect(SERVER, now=self.now)
        self.run()

    def run(self, rounds: int = 60) -> None:
        for _ in range(rounds):
            self.now += 0.002
            for data, _ in self.client.datagrams_to_send(now=self.now):
                self.server.receive_datagram(data, CLIENT, now=self.now)
            while (event := self.server.next_event()) is not None:
                self.server_events.append(event)
            for data, _ in self.server.datagrams_to_send(now=self.now):
                self.client.receive_datagram(data, SERVER, now=self.now)
            while (event := self.client.next_event()) is not None:
                self.client_events.append(event)
            for conn in (self.client, self.server):
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(now=self.now)

    def received(self, events: list[qe.QuicEvent], stream_id: int) -> bytes:
        return b"".join(
            e.data
            for e in events
            if isinstance(e, qe.StreamDataReceived) and e.stream_id == stream_id
        )


@pytest.fixture
def pair(tmp_path) -> Pair:
    return Pair(Pki(tmp_path))


def test_the_handshake_buffers_go_and_the_connection_still_works(pair):
    assert any(isinstance(e, qe.HandshakeCompleted) for e in pair.server_events)
    big = [pair.server._crypto_buffers[e].capacity for e in HANDSHAKE_EPOCHS]
    assert big == [16384] * 3  # aioquic's CRYPTO_BUFFER_SIZE, each
    release_handshake_buffers(pair.server)
    assert all(pair.server._crypto_buffers[e].capacity == 0 for e in HANDSHAKE_EPOCHS)

    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(stream_id, b"hello" * 500)
    pair.client.send_ping(7)
    pair.run()
    pair.server.send_stream_data(stream_id, b"ack" * 400, end_stream=True)
    pair.run()
    assert pair.received(pair.server_events, stream_id) == b"hello" * 500
    assert pair.received(pair.client_events, stream_id) == b"ack" * 400
    assert any(isinstance(e, qe.PingAcknowledged) and e.uid == 7 for e in pair.client_events)


def test_the_key_log_callbacks_and_the_checked_chain_go_and_the_connection_still_works(pair):
    from aioquic.quic.crypto import NoCallback

    release_handshake_buffers(pair.server)
    leaf, chain = take_client_chain(pair.server)
    assert leaf is not None
    assert peer_certificates(pair.server) == (None, [])
    for crypto in pair.server._cryptos.values():
        for context in (crypto.recv, crypto.send):
            assert context._setup_cb is NoCallback and context._teardown_cb is NoCallback
    # streams both ways and a key update (new keys, old ones torn down) still work
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(stream_id, b"up" * 3000)
    pair.run()
    pair.server.request_key_update()
    pair.server.send_stream_data(stream_id, b"down" * 2000, end_stream=True)
    pair.run()
    assert pair.received(pair.server_events, stream_id) == b"up" * 3000
    assert pair.received(pair.client_events, stream_id) == b"down" * 2000
    assert pair.server._state is QuicConnectionState.CONNECTED


def test_a_client_keeps_the_chain_it_was_shown(pair):
    take_client_chain(pair.client)
    assert peer_certificates(pair.client)[0] is not None


def test_a_handshake_message_after_the_handshake_is_refused_not_raised(pair):
    release_handshake_buffers(pair.server)
    # what a peer's CRYPTO frame in a 1-RTT packet hands the server's TLS context
    with pytest.raises(tls.AlertUnexpectedMessage):
        pair.server.tls.handle_message(
            bytes([tls.HandshakeType.FINISHED, 0, 0, 0]), pair.server._crypto_buffers
        )
    assert pair.server._state is QuicConnectionState.CONNECTED


def test_a_client_or_a_handshake_in_progress_keeps_its_buffers(pair, tmp_path):
    release_handshake_buffers(pair.client)
    assert all(pair.client._crypto_buffers[e].capacity == 16384 for e in HANDSHAKE_EPOCHS)
    fresh = Pair.__new__(Pair)
    fresh.client = QuicConnection(configuration=pair.client._configuration)
    fresh.server = MutualTlsServerConnection(
        configuration=pair.server._configuration,
        original_destination_connection_id=fresh.client._peer_cid.cid,
    )
    fresh.client.connect(SERVER, now=1.0)
    for data, _ in fresh.client.datagrams_to_send(now=1.0):
        fresh.server.receive_datagram(data, CLIENT, now=1.0)
    release_handshake_buffers(fresh.server)  # mid-handshake: nothing changes
    assert all(fresh.server._crypto_buffers[e].capacity == 16384 for e in HANDSHAKE_EPOCHS)


def test_server_connections_share_their_frame_handler_epoch_sets(pair):
    other = MutualTlsServerConnection(
        configuration=pair.server._configuration,
        original_destination_connection_id=b"\x01" * 8,
    )
    mine, theirs = getattr(pair.server, FRAME_HANDLERS), getattr(other, FRAME_HANDLERS)
    assert mine.keys() == theirs.keys()
    for frame_type, (handler, epochs) in mine.items():
        assert theirs[frame_type][1] is epochs
        assert handler.__self__ is pair.server  # the handlers stay the connection's own


def test_check_aioquic_fails_loudly_if_a_finished_server_would_take_a_message(monkeypatch):
    check_aioquic()
    monkeypatch.setattr(tls.Context, "handle_message", lambda self, data, out: None)
    with pytest.raises(UnsupportedAioquic, match="handshake's buffers"):
        check_aioquic()


def test_check_aioquic_fails_loudly_if_the_frame_handlers_move(monkeypatch):
    monkeypatch.setattr(mtls_hook, "FRAME_HANDLERS", "_QuicConnection__gone")
    with pytest.raises(UnsupportedAioquic, match="frame_handlers|__gone"):
        check_aioquic()
