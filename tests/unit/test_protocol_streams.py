"""Stream state tables and the channel core, without sockets."""

from __future__ import annotations

import zlib

import pytest

from margo_stream.errors import LocalProtocolError, RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.channel import ChannelCore, MessageReceived, StreamEnded, StreamFailed
from margo_stream.protocol.codes import ErrorCode, Sender, StreamKind
from margo_stream.protocol.frames import encode_frame
from margo_stream.protocol.streams import END, TRANSITIONS, State, StreamMachine, kind_of_opener

A, C = Sender.AGENT, Sender.CONTROLLER


def hello(device="p1"):
    return m.Hello(device_id=device, agent_version="t", capabilities=m.Capabilities(id=device))


def pair():
    return ChannelCore(A), ChannelCore(C)


def test_every_table_row_names_a_known_message_type():
    for (_kind, _state, _sender, mtype), new in TRANSITIONS.items():
        assert mtype == END or mtype in m.MESSAGE_TYPES
        assert isinstance(new, State)


@pytest.mark.parametrize(
    "kind, steps, final",
    [
        (
            StreamKind.CONTROL,
            [(A, "hello"), (C, "hello_ack"), (A, "ping"), (C, "pong"), (A, "stats")],
            State.READY,
        ),
        (
            StreamKind.DESIRED,
            [(C, "desired"), (C, "blob"), (C, "blob"), (C, END), (A, "desired_result")],
            State.DONE,
        ),
        (StreamKind.STATUS, [(A, "status"), (C, "status_ack"), (A, "status")], State.OPEN),
        (
            StreamKind.TELEMETRY,
            [(A, "telemetry"), (A, "telemetry"), (C, "telemetry_ack")],
            State.OPEN,
        ),
        (
            StreamKind.TERMINAL,
            [
                (C, "term_open"),
                (A, "term_opened"),
                (C, "term_data"),
                (A, "term_data"),
                (C, "term_resize"),
                (A, "term_exit"),
                (C, "term_close"),
            ],
            State.DONE,
        ),
        (
            StreamKind.TERMINAL,
            [
                (C, "term_open"),
                (A, "term_opened"),
                (A, "term_data"),
                (C, "term_ack"),
                (C, "term_data"),
                (A, "term_ack"),
                (C, "term_close"),
                (A, "term_ack"),
                (A, "term_exit"),
            ],
            State.DONE,
        ),
        (
            StreamKind.TERMINAL,
            [
                (C, "term_open"),
                (A, "term_opened"),
                (A, "term_data"),
                (A, "term_exit"),
                (C, "term_ack"),
                (C, "term_close"),
            ],
            State.DONE,
        ),
    ],
)
def test_happy_paths(kind, steps, final):
    machine = StreamMachine(kind, C)
    for sender, mtype in steps:
        machine.process(sender, mtype)
    assert machine.state is final


def test_desired_result_before_end_is_a_remote_error():
    machine = StreamMachine(StreamKind.DESIRED, C)
    machine.process(C, "desired")
    with pytest.raises(RemoteProtocolError) as info:
        machine.process(A, "desired_result")
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE
    with pytest.raises(RemoteProtocolError):  # sticky
        machine.process(C, "blob")


def test_term_ack_only_while_bytes_flow():
    machine = StreamMachine(StreamKind.TERMINAL, C)
    machine.process(C, "term_open")
    with pytest.raises(RemoteProtocolError):  # nothing flowed before term_opened
        machine.process(A, "term_ack")
    machine = StreamMachine(StreamKind.TERMINAL, C)
    for sender, mtype in [(C, "term_open"), (A, "term_opened"), (C, "term_close")]:
        machine.process(sender, mtype)
    with pytest.raises(LocalProtocolError):  # the operator closed: no more acks from it
        machine.process(C, "term_ack")
    assert m.parse_message({"t": "term_ack", "consumed": 5}) == m.TermAck(consumed=5)


def test_local_violation_is_a_local_error():
    machine = StreamMachine(StreamKind.CONTROL, A)
    with pytest.raises(LocalProtocolError):
        machine.process(A, "ping")  # before hello


def test_openers():
    assert kind_of_opener("hello", A) is StreamKind.CONTROL
    with pytest.raises(RemoteProtocolError) as info:
        kind_of_opener("desired", A)
    assert info.value.code == ErrorCode.WRONG_STREAM_OPENER
    with pytest.raises(RemoteProtocolError) as info:
        kind_of_opener("pong", A)
    assert info.value.code == ErrorCode.UNKNOWN_STREAM_KIND


def test_channel_core_handshake_and_events():
    agent, ctl = pair()
    events = ctl.receive(0, agent.encode(0, hello()))
    assert events == [MessageReceived(0, StreamKind.CONTROL, hello())]
    events = agent.receive(
        0, ctl.encode(0, m.HelloAck(tenant="acme", device_id="p1", server_time=0, keepalive_s=15))
    )
    assert isinstance(events[0].message, m.HelloAck)
    # a desired-state push is complete only at the controller's END
    frame = ctl.encode(1, m.Desired(version=1, manifest=b"{}", signature=b"s"))
    ctl.end(1)
    events = agent.receive(1, frame, end_stream=True)
    assert [type(e) for e in events] == [MessageReceived, StreamEnded]
    agent.encode(1, m.DesiredResult(version=1, ok=True))


def test_invalid_message_fails_only_its_stream():
    agent, ctl = pair()
    ctl.receive(0, agent.encode(0, hello()))
    bad = encode_frame({"t": "status", "seq": -1})
    events = ctl.receive(4, bad)
    assert isinstance(events[0], StreamFailed) and events[0].code == ErrorCode.INVALID_MESSAGE
    assert "seq" in events[0].reason
    assert ctl.receive(4, bad) == []  # ignored once failed
    # the control stream is unaffected
    agent.receive(
        0, ctl.encode(0, m.HelloAck(tenant="a", device_id="p1", server_time=0, keepalive_s=1))
    )
    assert ctl.receive(0, agent.encode(0, m.Ping(n=1))) != []


def test_peer_opening_a_controller_stream_fails():
    agent, ctl = pair()
    events = agent.receive(3, encode_frame({"t": "hello", "device_id": "x"}))
    assert events[0].code == ErrorCode.WRONG_STREAM_OPENER


def test_local_cannot_open_peer_kind():
    agent, _ = pair()
    with pytest.raises(LocalProtocolError):
        agent.encode(0, m.Desired(version=1, manifest=b"", signature=b""))


def test_reset_by_peer_reports_failure_once():
    agent, ctl = pair()
    ctl.receive(0, agent.encode(0, hello()))
    events = ctl.reset_received(0, ErrorCode.CANCELLED)
    assert events[0].reset_by_peer and events[0].kind is StreamKind.CONTROL
    assert ctl.reset_received(0, ErrorCode.CANCELLED)[0].kind is None


@pytest.mark.parametrize("share", [False, True])
def test_a_push_compressed_as_the_agents_hello_allows(share):
    """proto 3 (``share`` off): each compressed frame inflates on its own, as that agent's
    decoder does it; proto 4: a push's later frames refer back to its opener."""
    digest = "sha256:" + "ab" * 32
    controller, agent = ChannelCore(C), ChannelCore(A, inflate=True)
    controller.compress, controller.share_window = True, share
    manifest = (b'{"digest":"%s","url":"/d/%s"}' % (digest.encode(), digest.encode())) * 10
    sent = [
        m.Desired(version=1, manifest=manifest, signature=b"s" * 64, blobs=[digest]),
        m.Blob(digest=digest, data=b'{"kind":"deployment","digest":"%s"}' % digest.encode() * 8),
    ]
    frames = [controller.encode(1, message) for message in sent]
    alone = []
    for frame in frames:
        assert frame[0] & 0x80  # compressed
        try:
            alone.append(zlib.decompressobj(-15).decompress(frame[4:]) != b"")
        except zlib.error:
            alone.append(False)
    assert alone == [True, not share]
    events = agent.receive(1, b"".join(frames), end_stream=True)
    assert [e.message for e in events if isinstance(e, MessageReceived)] == sent
