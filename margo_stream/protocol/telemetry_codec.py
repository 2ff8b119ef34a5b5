"""Encoding of telemetry batches: msgpack ``[seq, stream, payload]`` triples, zlib-compressed
(telemetry is repetitive JSON, so a batch shrinks several times and the channel carries that
much more per second). The agent names each record's stream so the controller, which ingests
for the whole fleet, never has to parse a record.

``decode_batch`` runs on the controller at the trust boundary: every batch it accepts has
``count`` records in strictly increasing seq order, from ``first`` to ``last``, each seq a
positive integer the store can hold, each stream a non-empty string; anything else raises a
``RemoteProtocolError`` naming what was wrong. Its cost is bounded by the batch: the header is
checked before any decompression, decompression stops at ``MAX_BATCH_RAW`` bytes, and the
msgpack decoder keeps at most one list that is not a record (the outer one), so a hostile
batch cannot make it build more objects than a valid batch of the same size would.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import msgpack

from margo_stream.errors import RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode

MAX_BATCH_RAW = 8 << 20  # a decompressed batch never exceeds this
MAX_SEQ = 2**63 - 1  # sequence numbers are signed 64-bit integers in the store

Triple = tuple[int, str, bytes]


def encode_batch(records: Sequence[Triple], oldest: int, *, level: int = 1) -> m.Telemetry:
    raw = msgpack.packb([list(r) for r in records], use_bin_type=True)
    return m.Telemetry(
        oldest=oldest,
        first=records[0][0],
        last=records[-1][0],
        count=len(records),
        codec="zlib",
        data=zlib.compress(raw, level),
    )


class _BadBatch(Exception):
    """Raised from inside the msgpack decoder; turned into a RemoteProtocolError."""


def _why_not_triple(item: object) -> str:
    if not isinstance(item, list | tuple):
        return f"a record is a {type(item).__name__}, not a [seq, stream, payload] list"
    if len(item) != 3:
        return f"a record has {len(item)} fields, not 3 (seq, stream, payload)"
    seq, stream, payload = item
    if type(seq) is not int:
        return f"a record's seq is a {type(seq).__name__}, not an integer"
    if type(stream) is not str:
        return f"record {seq}: stream is a {type(stream).__name__}, not a string"
    return f"record {seq}: payload is a {type(payload).__name__}, not bytes"


class _Triples:
    """msgpack ``list_hook``: turns each valid ``[seq, stream, payload]`` list into a tuple as
    soon as it is decoded. Only one other list may exist (the outer one, which completes
    last), so a second one proves the first was a malformed record."""

    __slots__ = ("other",)

    def __init__(self) -> None:
        self.other: list[Any] | None = None

    def __call__(self, items: list[Any]) -> object:
        if (
            len(items) == 3
            and type(items[0]) is int
            and type(items[1]) is str
            and type(items[2]) is bytes
        ):
            return (items[0], items[1], items[2])
        if self.other is not None:
            raise _BadBatch(_why_not_triple(self.other))
        self.other = items
        return items


def _inflate(batch: m.Telemetry) -> bytes:
    if batch.codec != "zlib":
        if len(batch.data) > MAX_BATCH_RAW:
            raise _BadBatch(f"holds {len(batch.data)} bytes, more than {MAX_BATCH_RAW}")
        return batch.data
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(batch.data, MAX_BATCH_RAW)
    except zlib.error as exc:
        raise _BadBatch(f"not valid zlib data ({exc})") from None
    if inflater.unconsumed_tail:
        raise _BadBatch(f"decompresses to more than {MAX_BATCH_RAW} bytes")
    if not inflater.eof:
        raise _BadBatch("zlib data is cut short")
    if inflater.unused_data:
        raise _BadBatch(f"{len(inflater.unused_data)} bytes follow the zlib data")
    return raw


def _check_header(batch: m.Telemetry) -> str | None:
    if batch.first < 1:
        return "seq numbers start at 1"
    if batch.last > MAX_SEQ:
        return f"last seq is above {MAX_SEQ}"
    if batch.last < batch.first:
        return "last is below first"
    if batch.count > batch.last - batch.first + 1:
        return f"{batch.count} records cannot have distinct seqs in {batch.first}..{batch.last}"
    if batch.oldest > batch.first:
        return f"oldest retained record {batch.oldest} is after the batch's first record"
    return None


def decode_batch(batch: m.Telemetry) -> list[Triple]:
    """The batch's ``(seq, stream, payload)`` records; raises ``RemoteProtocolError``."""

    def bad(why: str) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"telemetry batch {batch.first}..{batch.last}: {why}", ErrorCode.INVALID_MESSAGE
        )

    why = _check_header(batch)
    if why is not None:
        raise bad(why)
    try:
        raw = _inflate(batch)
        hook = _Triples()
        items = msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            list_hook=hook,
            max_array_len=max(3, batch.count),
            max_map_len=0,
            max_ext_len=0,
        )
    except _BadBatch as exc:
        raise bad(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types
        raise bad(f"not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(items, list):
        raise bad(f"holds a {type(items).__name__}, not a list of records")
    if len(items) != batch.count:
        raise bad(f"holds {len(items)} records, header says {batch.count}")
    prev = batch.first - 1
    for item in items:
        if not isinstance(item, tuple):
            raise bad(_why_not_triple(item))
        seq, stream = item[0], item[1]
        if seq <= prev:
            if prev < batch.first:
                raise bad(f"record {seq} is below the header's first")
            raise bad(f"record {seq} is not above the one before it ({prev})")
        if seq > batch.last:
            raise bad(f"record {seq} is above the header's last")
        if not stream:
            raise bad(f"record {seq}: empty stream name")
        prev = seq
    out: list[Triple] = items
    if out[0][0] != batch.first or out[-1][0] != batch.last:
        raise bad(f"records run {out[0][0]}..{out[-1][0]}, not from first to last")
    return out
