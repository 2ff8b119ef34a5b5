"""Encoding of telemetry batches: msgpack ``[seq, stream, payload]`` triples, zlib-compressed
(telemetry is repetitive JSON, so a batch shrinks several times and the channel carries that
much more per second). The agent names each record's stream so the controller, which ingests
for the whole fleet, never has to parse a record."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import msgpack

from margo_stream.errors import RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode

MAX_BATCH_RAW = 8 << 20  # a decompressed batch never exceeds this


def encode_batch(
    records: Sequence[tuple[int, str, bytes]], oldest: int, *, level: int = 1
) -> m.Telemetry:
    raw = msgpack.packb([list(r) for r in records], use_bin_type=True)
    return m.Telemetry(
        oldest=oldest,
        first=records[0][0],
        last=records[-1][0],
        count=len(records),
        codec="zlib",
        data=zlib.compress(raw, level),
    )


def decode_batch(batch: m.Telemetry) -> list[tuple[int, str, bytes]]:
    def bad(why: str) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"telemetry batch {batch.first}..{batch.last}: {why}", ErrorCode.INVALID_MESSAGE
        )

    if batch.codec == "zlib":
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(batch.data, MAX_BATCH_RAW)
        except zlib.error as exc:
            raise bad(f"not valid zlib data ({exc})") from None
        if inflater.unconsumed_tail:
            raise bad(f"decompresses to more than {MAX_BATCH_RAW} bytes")
    else:
        raw = batch.data
    try:
        pairs = msgpack.unpackb(raw, raw=False, use_list=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types
        raise bad(f"not valid msgpack ({exc})") from None
    if not isinstance(pairs, list) or len(pairs) != batch.count:
        raise bad(
            f"holds {len(pairs) if isinstance(pairs, list) else 'no list of'} records, "
            f"header says {batch.count}"
        )
    out: list[tuple[int, str, bytes]] = []
    prev = 0
    for item in pairs:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], int)
            or not isinstance(item[1], str)
            or not isinstance(item[2], bytes)
            or item[0] <= prev
        ):
            raise bad("records must be [seq, stream, bytes] triples in increasing seq order")
        prev = item[0]
        out.append((item[0], item[1], item[2]))
    if out[0][0] != batch.first or out[-1][0] != batch.last:
        raise bad("first/last do not match the records")
    return out
