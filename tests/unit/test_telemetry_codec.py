"""Telemetry batch codec: round trips, and every malformed or hostile batch refused at the
trust boundary with a specific RemoteProtocolError, at a cost bounded by the batch."""

from __future__ import annotations

import time
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from margo_stream.errors import RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.protocol.telemetry_codec import (
    MAX_BATCH_RAW,
    MAX_SEQ,
    decode_batch,
    encode_batch,
)


def raw_batch(
    items: object,
    *,
    first: int = 1,
    last: int = 3,
    count: int = 3,
    oldest: int = 1,
    codec: str = "zlib",
) -> m.Telemetry:
    raw = msgpack.packb(items, use_bin_type=True)
    data = zlib.compress(raw) if codec == "zlib" else raw
    return m.Telemetry(oldest=oldest, first=first, last=last, count=count, codec=codec, data=data)


def refused(batch: m.Telemetry, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode_batch(batch)
    assert info.value.code == ErrorCode.INVALID_MESSAGE


GOOD = [[1, "m", b"a"], [2, "m", b"b"], [3, "logs", b"c"]]


def test_round_trip_keeps_streams_and_gaps() -> None:
    records = [(5, "metrics", b'{"v":1}'), (7, "logs", b""), (9, "metrics", b"\xff\x00")]
    batch = encode_batch(records, oldest=4)
    assert (batch.first, batch.last, batch.count, batch.oldest) == (5, 9, 3, 4)
    assert decode_batch(batch) == records


def test_uncompressed_batches_decode() -> None:
    assert decode_batch(raw_batch(GOOD, codec="none")) == [tuple(r) for r in GOOD]


records_strategy = st.lists(
    st.tuples(st.integers(1, 5), st.text(min_size=1, max_size=8), st.binary(max_size=32)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(records_strategy, st.integers(1, MAX_SEQ // 2))
def test_property_round_trip(steps: list[tuple[int, str, bytes]], start: int) -> None:
    seq = start
    records = []
    for step, stream, payload in steps:
        seq += step
        records.append((seq, stream, payload))
    assert decode_batch(encode_batch(records, oldest=start)) == records


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"first": 0, "last": 2, "count": 3, "oldest": 0}, "start at 1"),
        ({"first": 3, "last": 1}, "last is below first"),
        ({"first": 1, "last": 2, "count": 3}, "cannot have distinct seqs"),
        ({"first": 1, "last": MAX_SEQ + 1, "count": 3}, "above"),
        ({"oldest": 2}, "oldest retained record 2 is after"),
    ],
)
def test_header_checked_before_decompression(header: dict[str, int], match: str) -> None:
    batch = raw_batch(GOOD).model_copy(update={"data": b"never inflated", **header})
    refused(batch, match)


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ({"a": 1}, "not valid msgpack"),  # maps are refused outright
        ("text", "not a list of records"),
        ([[1, "m", b"a"], [2, "m", b"b"]], "holds 2 records, header says 3"),
        ([[1, "m", b"a"], [2, "m"], [3, "m", b"c"]], "has 2 fields, not 3"),
        ([[1, "m", b"a"], 7, [3, "m", b"c"]], "a record is a int"),
        ([[1, "m", b"a"], ["2", "m", b"b"], [3, "m", b"c"]], "seq is a str"),
        ([[1, "m", b"a"], [True, "m", b"b"], [3, "m", b"c"]], "seq is a bool"),
        ([[1, "m", b"a"], [2, b"m", b"b"], [3, "m", b"c"]], "stream is a bytes"),
        ([[1, "m", b"a"], [2, "m", "b"], [3, "m", b"c"]], "payload is a str"),
        ([[1, "m", b"a"], [2, "", b"b"], [3, "m", b"c"]], "empty stream name"),
        ([[1, "m", b"a"], [1, "m", b"b"], [3, "m", b"c"]], "not above the one before"),
        ([[1, "m", b"a"], [3, "m", b"b"], [2, "m", b"c"]], "not above the one before"),
        ([[0, "m", b"a"], [2, "m", b"b"], [3, "m", b"c"]], "below the header's first"),
        ([[1, "m", b"a"], [2, "m", b"b"], [4, "m", b"c"]], "above the header's last"),
        ([[1, "m", b"a"], [2, "m", b"b"], [2.5, "m", b"c"]], "seq is a float"),
        ([[[1, "m", b"a"]], [[2, "m", b"b"]], [3, "m", b"c"]], "record is a tuple|fields"),
    ],
)
def test_malformed_records(items: object, match: str) -> None:
    refused(raw_batch(items), match)


def test_first_and_last_must_match_the_records() -> None:
    refused(
        raw_batch([[2, "m", b"a"], [3, "m", b"b"], [4, "m", b"c"]], last=4),
        "below the header's first|not from first to last",
    )
    refused(
        raw_batch([[1, "m", b"a"], [2, "m", b"b"], [3, "m", b"c"]], last=4),
        "not from first to last",
    )


def test_invalid_utf8_stream() -> None:
    raw = bytearray(msgpack.packb(GOOD, use_bin_type=True))
    raw[raw.index(b"logs")] = 0xFF
    batch = m.Telemetry(oldest=1, first=1, last=3, count=3, codec="none", data=bytes(raw))
    refused(batch, "not valid msgpack")


def test_zlib_damage_is_named() -> None:
    good = raw_batch(GOOD)
    refused(good.model_copy(update={"data": b"garbage"}), "not valid zlib data")
    refused(good.model_copy(update={"data": good.data[:-6]}), "cut short")
    refused(good.model_copy(update={"data": good.data + b"tail"}), "4 bytes follow")


def test_trailing_msgpack_bytes() -> None:
    data = msgpack.packb(GOOD, use_bin_type=True) + b"\x00"
    refused(
        m.Telemetry(oldest=1, first=1, last=3, count=3, codec="none", data=data),
        "not valid msgpack",
    )


def test_decompression_bomb_stops_at_the_limit() -> None:
    bomb = zlib.compress(b"\x00" * (MAX_BATCH_RAW + 1), 9)
    assert len(bomb) < 64 * 1024
    refused(m.Telemetry(oldest=1, first=1, last=3, count=3, data=bomb), "more than")
    big = b"\x00" * (MAX_BATCH_RAW + 1)
    refused(m.Telemetry(oldest=1, first=1, last=3, count=3, codec="none", data=big), "more than")


def test_nested_lists_cost_little() -> None:
    # A megabyte of one-byte empty lists (and deep nesting) must fail fast, without building
    # a million objects first.
    wide = b"\xdc\x00\x03" + b"\x91" * 3 + b"\xdd" + (10**6).to_bytes(4, "big") + b"\x90" * 10**6
    deep = b"\x91" * 100_000 + b"\x01"
    for data in (wide, deep):
        batch = m.Telemetry(oldest=1, first=1, last=3, count=3, codec="none", data=data)
        started = time.perf_counter()
        with pytest.raises(RemoteProtocolError):
            decode_batch(batch)
        assert time.perf_counter() - started < 0.5


def test_outer_array_longer_than_count_is_refused_early() -> None:
    items = [[i, "m", b""] for i in range(1, 1001)]
    refused(raw_batch(items, last=1000, count=3), "not valid msgpack.*exceeds max_array_len")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256), st.sampled_from(["none", "zlib"]), st.integers(1, 4))
def test_fuzzed_batches_only_raise_protocol_errors(data: bytes, codec: str, count: int) -> None:
    batch = m.Telemetry(oldest=1, first=1, last=8, count=count, codec=codec, data=data)
    try:
        records = decode_batch(batch)
    except RemoteProtocolError:
        return
    assert len(records) == count and records[0][0] == 1 and records[-1][0] == 8


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.text(max_size=4)
        | st.binary(max_size=4),
        lambda children: st.lists(children, max_size=4),
        max_leaves=20,
    ),
    st.integers(1, 4),
)
def test_fuzzed_structures_only_raise_protocol_errors(items: object, count: int) -> None:
    batch = raw_batch(items, first=1, last=4, count=count)
    try:
        records = decode_batch(batch)
    except RemoteProtocolError:
        return
    assert len(records) == count
