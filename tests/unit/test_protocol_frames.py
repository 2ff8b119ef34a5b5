"""Frame codec: round trips at any split, limits, malformed input, sticky errors."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from margo_stream.errors import LocalProtocolError, RemoteProtocolError
from margo_stream.protocol.codes import ErrorCode
from margo_stream.protocol.frames import FrameDecoder, encode_frame

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=50)
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.dictionaries(st.text(max_size=8), values, max_size=5).map(lambda d: {**d, "t": "x"})


@given(st.lists(messages, min_size=1, max_size=5), st.data())
def test_round_trip_at_any_split(msgs, data):
    wire = b"".join(encode_frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = FrameDecoder()
    out = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        out.extend(decoder.feed(wire[prev:cut]))
        prev = cut
    decoder.finish()
    assert out == msgs
    assert decoder.buffered == 0


def test_encode_refuses_oversized_message():
    with pytest.raises(LocalProtocolError) as info:
        encode_frame({"t": "blob", "data": b"x" * 2000}, max_frame=1000)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_oversized_frame_refused_from_its_length_prefix_alone():
    decoder = FrameDecoder(max_frame=1000)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(struct.pack(">I", 1001))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert "1001" in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"x": 1}),
        msgpack.packb({"t": 5}),
        msgpack.packb({1: "a"}),
    ],
)
def test_malformed_payloads(payload):
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(struct.pack(">I", len(payload)) + payload)
    assert info.value.code == ErrorCode.MALFORMED_FRAME


def test_errors_are_sticky():
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(struct.pack(">I", 1) + b"\xc1")
    with pytest.raises(RemoteProtocolError):
        decoder.feed(encode_frame({"t": "ok"}))


def test_truncated_stream():
    decoder = FrameDecoder()
    frame = encode_frame({"t": "ping", "n": 1})
    assert decoder.feed(frame[:-1]) == []
    with pytest.raises(RemoteProtocolError) as info:
        decoder.finish()
    assert info.value.code == ErrorCode.TRUNCATED_STREAM
