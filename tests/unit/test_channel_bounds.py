"""What a hostile peer can make ``ChannelCore`` hold: failed streams, unparsed bytes, nothing
of an exception."""

from __future__ import annotations

import gc
import struct
import weakref

import pytest

from bench.fuzz_channel import exception_objects
from margo_stream.errors import LocalProtocolError, RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.channel import (
    DEFAULT_MAX_FAILED_STREAMS,
    DEFAULT_MAX_FAILED_TOTAL,
    ChannelCore,
    ConnectionFailed,
    MessageReceived,
    StreamEnded,
    StreamFailed,
)
from margo_stream.protocol.codes import DEFAULT_MAX_FRAME, ErrorCode, Sender
from margo_stream.protocol.frames import FrameDecoder, encode_frame

A, C = Sender.AGENT, Sender.CONTROLLER
BAD = struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1"  # a frame that is not msgpack
INVALID = encode_frame({"t": "status", "seq": -1})  # msgpack, but an invalid message


def status(seq: int = 1) -> bytes:
    s = m.Status(seq=seq, deployment_id="d", manifest_version=1, state="installed")
    return encode_frame(m.to_wire(s))


def unfinished(size: int = DEFAULT_MAX_FRAME) -> bytes:
    """The first 64 KiB of a frame that announces ``size`` bytes."""
    return struct.pack(">I", size) + b"\x00" * (64 * 1024)


def test_failed_streams_keep_no_exception_and_no_decoder():
    core = ChannelCore(C)
    for sid in range(0, 400, 4):
        events = core.receive(sid, BAD if sid % 8 else INVALID)
        assert isinstance(events[-1], StreamFailed)
        core.reset_received(sid, ErrorCode.MALFORMED_FRAME)  # the peer answers STOP_SENDING
    for sid in range(400, 440, 4):  # failed and not (yet) closed by the peer
        core.receive(sid, BAD)
    assert core.failed_streams == 10 and len(core) == 10 and core.failed_total == 110
    gc.collect()
    # nothing the core can reach is an exception, a traceback or a frame (the old core kept
    # each failed stream's decoder, whose sticky error held its traceback and the call's bytes)
    assert exception_objects(core) == []
    assert core._streams == {}  # no decoder, no machine for any failed stream


def test_raised_errors_are_not_retained():
    core = ChannelCore(C)
    seen: list[weakref.ref[BaseException]] = []
    decoder = FrameDecoder()
    for _ in range(3):
        try:
            decoder.feed(BAD)
        except RemoteProtocolError as exc:
            seen.append(weakref.ref(exc))
    assert decoder.failed and exception_objects(decoder) == []
    gc.collect()
    assert all(ref() is None for ref in seen)  # sticky, yet a fresh error each time
    with pytest.raises(RemoteProtocolError) as info:
        decoder.finish()
    assert info.value.code == ErrorCode.MALFORMED_FRAME
    # an invalid message on a stream: the pydantic error behind it is gone too
    core.receive(0, INVALID)
    gc.collect()
    assert exception_objects(core) == []


def test_late_data_on_a_failed_stream_is_ignored_until_the_peer_closes_it():
    core = ChannelCore(C)
    assert isinstance(core.receive(4, BAD)[0], StreamFailed)
    assert core.receive(4, status()) == []
    assert core.receive(4, b"\x00" * 100, end_stream=True) == []  # FIN: the record goes
    assert len(core) == 0
    # a bad frame with the FIN in the same delivery: nothing can follow, no record at all
    assert isinstance(core.receive(8, BAD, end_stream=True)[0], StreamFailed)
    assert len(core) == 0 and core.failed_total == 2


def test_concurrent_failed_streams_are_capped():
    core = ChannelCore(C)
    for i in range(DEFAULT_MAX_FAILED_STREAMS):
        events = core.receive(4 * i, BAD)
        assert [type(e) for e in events] == [StreamFailed]
    events = core.receive(4 * DEFAULT_MAX_FAILED_STREAMS, BAD)
    assert [type(e) for e in events] == [StreamFailed, ConnectionFailed]
    assert events[-1].code == ErrorCode.STREAM_LIMIT
    assert "not closed by the peer" in events[-1].reason
    # the connection is over: the core holds nothing and ignores everything
    assert len(core) == 0 and core.buffered == 0 and core.closed == events[-1]
    assert core.receive(1000, BAD) == [] and core.reset_received(4, 0) == []
    with pytest.raises(LocalProtocolError):
        core.encode(1, m.Desired(version=1, manifest=b"", signature=b""))


def test_total_failed_streams_are_capped_even_when_the_peer_closes_each():
    core = ChannelCore(C)
    for i in range(DEFAULT_MAX_FAILED_TOTAL):
        assert [type(e) for e in core.receive(4 * i, BAD)] == [StreamFailed]
        assert core.reset_received(4 * i, ErrorCode.MALFORMED_FRAME) == []
        assert core.failed_streams == 0
    events = core.receive(4 * DEFAULT_MAX_FAILED_TOTAL, BAD)
    assert isinstance(events[-1], ConnectionFailed)
    assert events[-1].code == ErrorCode.STREAM_LIMIT
    assert f"{DEFAULT_MAX_FAILED_TOTAL + 1} streams failed" in events[-1].reason


def test_our_resets_count_against_the_peer_only_for_protocol_errors():
    core = ChannelCore(C, max_failed_streams=1000, max_failed_total=3)
    for sid in range(0, 400, 4):  # operator cancels: never the peer's fault
        core.receive(sid, status())
        assert core.fail(sid, ErrorCode.CANCELLED) == []
        core.reset_received(sid, ErrorCode.CANCELLED)
    assert core.failed_total == 0 and len(core) == 0
    for sid in (400, 404, 408):
        assert core.fail(sid, ErrorCode.UNEXPECTED_MESSAGE) == []
    events = core.fail(412, ErrorCode.PROTOCOL_ERROR)
    assert [e.code for e in events] == [ErrorCode.STREAM_LIMIT]


def test_our_resets_count_as_concurrent_failed_streams():
    core = ChannelCore(C, max_failed_streams=2)
    assert core.fail(0) == [] and core.fail(4) == []
    assert core.receive(0, status()) == []  # late bytes after our reset: ignored
    assert [e.code for e in core.fail(8)] == [ErrorCode.STREAM_LIMIT]


def test_buffer_budget_stops_unfinished_frames_on_many_streams():
    """150 streams each holding an unfinished 1 MiB frame: stopped at the budget (4 MiB)."""
    core = ChannelCore(C)
    assert core.buffer_budget == 4 * DEFAULT_MAX_FRAME
    chunk = b"\x00" * (64 * 1024)
    failed = None
    for i in range(150):
        sid = 4 * i
        assert core.receive(sid, struct.pack(">I", DEFAULT_MAX_FRAME - 100)) == []
        for _ in range(15):  # 15 x 64 KiB: just under the announced size
            events = core.receive(sid, chunk)
            if events:
                failed = events
                break
            assert core.buffered <= core.buffer_budget
        if failed:
            break
    assert failed is not None and i == 4  # the fifth stream crosses 4 MiB
    assert [type(e) for e in failed] == [ConnectionFailed]
    assert failed[0].code == ErrorCode.BUFFER_LIMIT and "budget" in failed[0].reason
    assert core.buffered == 0 and len(core) == 0


def test_buffer_accounting_follows_frames_streams_and_resets():
    core = ChannelCore(C, max_frame=1000, buffer_budget=2500)
    frame = status()
    # whole frames in any split never stay counted
    for i in range(200):
        core.receive(0, frame[: i % len(frame)])
        core.receive(0, frame[i % len(frame) :])
    assert core.buffered == 0
    core.receive(4, struct.pack(">I", 900) + b"\x00" * 800)
    core.receive(8, struct.pack(">I", 900) + b"\x00" * 800)
    assert core.buffered == 2 * 804
    core.reset_received(4, ErrorCode.CANCELLED)  # the peer gave up on one: its bytes go
    assert core.buffered == 804
    core.fail(8)  # we reset the other
    assert core.buffered == 0
    assert core.receive(12, struct.pack(">I", 900) + b"\x00" * 896) == []
    assert core.receive(16, struct.pack(">I", 900) + b"\x00" * 896) == []
    assert core.buffered == 1800
    events = core.receive(20, struct.pack(">I", 900) + b"\x00" * 896)  # 2,700 > 2,500
    assert [e.code for e in events] == [ErrorCode.BUFFER_LIMIT]


def test_streams_ended_both_ways_are_dropped():
    agent, ctl = ChannelCore(A), ChannelCore(C)
    for sid in range(0, 4000, 4):
        s = m.Status(seq=sid + 1, deployment_id="d", manifest_version=1, state="installed")
        events = ctl.receive(sid, agent.encode(sid, s), end_stream=True)
        assert [type(e) for e in events] == [MessageReceived, StreamEnded]
        ctl.encode(sid, m.StatusAck(seq=sid + 1))
        ctl.end(sid)
    assert len(ctl) == 0  # neither decoder nor machine of a finished stream is kept
    # a desired push: we end first, the peer's verdict and END come after
    ctl.encode(1, m.Desired(version=1, manifest=b"{}", signature=b"s"))
    ctl.end(1)
    assert len(ctl) == 1
    result = encode_frame(m.to_wire(m.DesiredResult(version=1, ok=True)))
    assert [type(e) for e in ctl.receive(1, result, end_stream=True)] == [
        MessageReceived,
        StreamEnded,
    ]
    assert len(ctl) == 0
    agent.encode(0, m.Status(seq=9, deployment_id="d", manifest_version=1, state="failed"))
    agent.end(0)
    with pytest.raises(LocalProtocolError, match="ended our direction"):
        agent.encode(0, m.Status(seq=10, deployment_id="d", manifest_version=1, state="failed"))


def test_late_bytes_on_a_stream_we_forgot_are_ignored_not_counted():
    agent, ctl = ChannelCore(A), ChannelCore(C)
    for sid in range(1, 4001, 4):  # pushes we gave up on while the device was still answering
        push = ctl.encode(sid, m.Desired(version=1, manifest=b"{}", signature=b"s"))
        ctl.end(sid)
        agent.receive(sid, push, end_stream=True)
        ctl.forget(sid)
        late = agent.encode(sid, m.DesiredResult(version=1, ok=True))
        assert ctl.receive(sid, late) == []  # not a new stream opened with a result
        assert ctl.receive(sid, b"", end_stream=True) == []
    assert ctl.failed_total == 0 and len(ctl) == 0
    ctl.encode(4001, m.Desired(version=2, manifest=b"{}", signature=b"s"))
    ctl.forget(4001)
    assert len(ctl) == 1
    assert ctl.reset_received(4001, ErrorCode.CANCELLED) == []  # the peer's reset ends it
    assert len(ctl) == 0
