"""The desired-state push, both ends, sans-IO: what the controller sends and what the device
accepts, chunk by chunk."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from margo_stream.errors import RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.protocol.push import (
    AssembledPush,
    PushAssembler,
    PushRefused,
    blob_chunks,
    plan_push,
)

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64


def opener(*blobs: str) -> m.Desired:
    return m.Desired(version=7, manifest=b"{}", signature=b"s" * 64, blobs=list(blobs))


def test_plan_sends_only_what_the_device_lacks_sorted() -> None:
    desired = plan_push(7, b"{}", b"sig", [C, A, B, A], held=[B])
    assert desired.blobs == [A, C] and desired.version == 7


@pytest.mark.parametrize("size", [0, 1, 10, 11, 25])
def test_chunks_cover_the_blob_and_only_the_last_says_done(size: int) -> None:
    data = bytes(range(256)) * 1
    data = data[:size]
    chunks = list(blob_chunks(A, data, chunk=10))
    assert b"".join(c.data for c in chunks) == data
    assert [c.more for c in chunks] == [True] * (len(chunks) - 1) + [False]
    assert len(chunks) == max(1, -(-size // 10))


@given(st.lists(st.binary(max_size=50), min_size=1, max_size=4), st.integers(1, 17))
def test_assembler_rebuilds_what_the_controller_chunked(blobs: list[bytes], chunk: int) -> None:
    digests = [f"sha256:{i:064x}" for i in range(len(blobs))]
    assembler = PushAssembler(opener(*digests))
    for digest, data in zip(digests, blobs, strict=True):
        for message in blob_chunks(digest, data, chunk=chunk):
            assert assembler.receive(message) is None
    push = assembler.finish()
    assert isinstance(push, AssembledPush)
    assert push.blobs == dict(zip(digests, blobs, strict=True))


def test_an_unannounced_blob_is_a_protocol_fault() -> None:
    assembler = PushAssembler(opener(A))
    with pytest.raises(RemoteProtocolError, match="not announced") as info:
        assembler.receive(m.Blob(digest=B, data=b"x", more=False))
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE


def test_a_blob_sent_twice_or_interleaved_is_a_protocol_fault() -> None:
    assembler = PushAssembler(opener(A, B))
    assembler.receive(m.Blob(digest=A, data=b"x", more=False))
    with pytest.raises(RemoteProtocolError, match="again"):
        assembler.receive(m.Blob(digest=A, data=b"y", more=False))

    assembler = PushAssembler(opener(A, B))
    assembler.receive(m.Blob(digest=A, data=b"x", more=True))
    with pytest.raises(RemoteProtocolError, match="before blob"):
        assembler.receive(m.Blob(digest=B, data=b"y", more=False))


def test_another_message_inside_a_push_is_a_protocol_fault() -> None:
    with pytest.raises(RemoteProtocolError, match="Ping"):
        PushAssembler(opener(A)).receive(m.Ping(n=1))


def test_an_opener_announcing_a_blob_twice_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="twice"):
        PushAssembler(opener(A, A))


def test_a_blob_cut_short_is_a_truncated_stream() -> None:
    assembler = PushAssembler(opener(A))
    assembler.receive(m.Blob(digest=A, data=b"x", more=True))
    with pytest.raises(RemoteProtocolError) as info:
        assembler.finish()
    assert info.value.code == ErrorCode.TRUNCATED_STREAM


def test_an_unsent_blob_is_left_to_the_trust_layer() -> None:
    push = PushAssembler(opener(A, B)).finish()
    assert push.blobs == {}


def test_more_bytes_than_the_device_holds_is_refused_not_buffered() -> None:
    assembler = PushAssembler(opener(A), max_bytes=100)
    assert assembler.receive(m.Blob(digest=A, data=b"x" * 20, more=True)) is None
    refused = assembler.receive(m.Blob(digest=A, data=b"x" * 200, more=False))
    assert refused == PushRefused("too-large", "push exceeds 100 bytes")
    assert assembler.total > 100
