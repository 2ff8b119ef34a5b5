"""Frame codec: round trips at any split, limits, malformed input, sticky errors."""

from __future__ import annotations

import os
import struct
import zlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from margo_stream.errors import LocalProtocolError, RemoteProtocolError
from margo_stream.protocol.codes import ErrorCode
from margo_stream.protocol.frames import (
    COMPRESS_MAX,
    COMPRESSED,
    WINDOW,
    FrameDecoder,
    SharedWindow,
    encode_frame,
)

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


# --- compressed frames ---------------------------------------------------------------------------
def _compressed(body: bytes) -> bytes:
    return struct.pack(">I", len(body) | COMPRESSED) + body


def _deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


PUSH_LIKE = {"t": "desired", "manifest": b'{"deployments":[' + b'{"id":"web"},' * 80 + b"]}"}


@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_compressed_and_plain_frames_round_trip_at_any_split(msgs, data):
    msgs = [*msgs, PUSH_LIKE]
    wire = b"".join(encode_frame(m, compress=True) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = FrameDecoder(inflate=True)
    out = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        out.extend(decoder.feed(wire[prev:cut]))
        prev = cut
    assert out == msgs


def test_only_mid_sized_compressible_frames_are_compressed():
    (length,) = struct.unpack_from(">I", frame := encode_frame(PUSH_LIKE, compress=True))
    assert length & COMPRESSED and len(frame) < len(encode_frame(PUSH_LIKE)) * 0.6
    assert encode_frame(PUSH_LIKE) == encode_frame(PUSH_LIKE, compress=False)  # off by default
    small = {"t": "ping", "n": 1}
    assert encode_frame(small, compress=True) == encode_frame(small)
    noise = {"t": "blob", "data": os.urandom(4096)}  # compresses to no gain: sent as it is
    assert encode_frame(noise, compress=True) == encode_frame(noise)
    big = {"t": "blob", "data": b"a" * (COMPRESS_MAX + 1)}  # a file's chunk: not worth the CPU
    assert encode_frame(big, compress=True) == encode_frame(big)


def test_a_compressed_frame_is_refused_where_none_was_offered():
    decoder = FrameDecoder()  # the controller's: agents never send compressed frames
    with pytest.raises(RemoteProtocolError) as exc:
        decoder.feed(encode_frame(PUSH_LIKE, compress=True))
    assert exc.value.code == ErrorCode.MALFORMED_FRAME
    assert "compressed frame" in str(exc.value)


def test_a_frame_inflating_past_the_limit_is_refused_after_the_limit():
    bomb = _deflate(msgpack.packb({"t": "x", "pad": b"\0" * (1 << 20)}))
    assert len(bomb) < 2048  # 1 MiB of zeros in about a kilobyte
    decoder = FrameDecoder(64 * 1024, inflate=True)
    with pytest.raises(RemoteProtocolError) as exc:
        decoder.feed(_compressed(bomb))
    assert exc.value.code == ErrorCode.FRAME_TOO_LARGE
    assert "inflates past the 65536-byte limit" in str(exc.value)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"\xff\xff\xff\xff not deflate", "does not inflate"),
        (_deflate(msgpack.packb({"t": "x", "a": "b" * 600}))[:-4], "cut short"),
        (_deflate(msgpack.packb({"t": "x"})) + b"trailing", "bytes after its end"),
        (_deflate(b"\xc1 not msgpack"), "not valid msgpack"),
    ],
)
def test_malformed_compressed_frames_are_named(body, says):
    decoder = FrameDecoder(inflate=True)
    with pytest.raises(RemoteProtocolError) as exc:
        decoder.feed(_compressed(body))
    assert exc.value.code == ErrorCode.MALFORMED_FRAME
    assert says in str(exc.value)
    with pytest.raises(RemoteProtocolError):  # sticky, like every decoder error
        decoder.feed(encode_frame({"t": "x"}))


# --- a stream's shared window ---------------------------------------------------------------------
DIGEST = "sha256:" + "0123456789abcdef" * 4
OPENER = {
    "t": "desired",
    "manifest": f'{{"digest":"{DIGEST}","url":"/d/{DIGEST}"}}'.encode() * 8,
    "blobs": [DIGEST],
}
FILE = {"t": "blob", "digest": DIGEST, "data": os.urandom(200) + b'{"name":"web"}' * 30}


def _inflates_alone(frame: bytes) -> bool:
    try:
        zlib.decompressobj(-15).decompress(frame[4:])
    except zlib.error:
        return False
    return True


@given(st.lists(messages, max_size=3), st.data())
def test_frames_sharing_a_window_round_trip_at_any_split(msgs, data):
    window = SharedWindow()
    sent = [OPENER, *msgs, FILE, OPENER]
    wire = b"".join(encode_frame(m, compress=True, window=window) for m in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = FrameDecoder(inflate=True)
    out = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        out.extend(decoder.feed(wire[start:end]))
    assert out == sent


def test_a_frame_refers_back_to_its_stream_and_comes_out_shorter():
    window = SharedWindow()
    first = encode_frame(OPENER, compress=True, window=window)
    shared = encode_frame(FILE, compress=True, window=window)
    alone = encode_frame(FILE, compress=True)
    assert len(shared) < len(alone) - 25  # the digest the opener already had
    assert _inflates_alone(first) and not _inflates_alone(shared)
    assert FrameDecoder(inflate=True).feed(first + shared) == [OPENER, FILE]


def test_a_window_keeping_decoder_takes_frames_compressed_without_one():
    """An agent of today behind a controller that compresses frame by frame (proto 3)."""
    wire = b"".join(encode_frame(m, compress=True) for m in (OPENER, FILE, OPENER))
    assert FrameDecoder(inflate=True).feed(wire) == [OPENER, FILE, OPENER]


def test_only_compressible_frames_enter_a_window_and_it_stays_bounded():
    window = SharedWindow()
    for seq in range(1000):  # a long-lived status stream's acknowledgements: nothing kept
        encode_frame({"t": "status_ack", "seq": seq}, compress=True, window=window)
    assert window.data == b""
    encode_frame({"t": "blob", "data": b"a" * (COMPRESS_MAX + 1)}, compress=True, window=window)
    assert window.data == b""  # a file's chunk is not compressed: not kept either
    for n in range(40):
        encode_frame({**OPENER, "n": n}, compress=True, window=window)
    assert len(window.data) == WINDOW


def test_a_frame_that_needs_a_window_the_decoder_lacks_is_named():
    window = SharedWindow()
    encode_frame(OPENER, compress=True, window=window)
    decoder = FrameDecoder(inflate=True)  # it never saw the opener
    with pytest.raises(RemoteProtocolError) as exc:
        decoder.feed(encode_frame(FILE, compress=True, window=window))
    assert exc.value.code == ErrorCode.MALFORMED_FRAME
    assert "does not inflate" in str(exc.value)
