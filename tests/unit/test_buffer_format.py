"""Telemetry buffer record format: stream names kept with records (version 2), segments
written in the version-1 format still read after an upgrade, and the durable wake-up."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anyio
import pytest

from agent.telemetry.buffer import BufferConfig, Record, TelemetryBuffer
from agent.telemetry.segments import (
    MAX_STREAM_BYTES,
    REC_HDR_SIZE,
    decode_record,
    encode_record,
    encode_record_v1,
    encode_segment_header,
    scan_segment,
    segment_name,
)
from agent.telemetry.streams import stream_of

SMALL = BufferConfig(max_bytes=16384, segment_bytes=2048, max_record_bytes=256)


def payload(stream: str | None, i: int) -> bytes:
    obj: dict[str, object] = {"i": i}
    if stream is not None:
        obj["stream"] = stream
    return json.dumps(obj, separators=(",", ":")).encode()


def test_record_round_trip_both_versions() -> None:
    assert decode_record(encode_record(7, b"{}", "metrics"), 7) == ("metrics", b"{}")
    assert decode_record(encode_record(7, b"{}"), 7) == (None, b"{}")  # no name stored
    assert decode_record(encode_record(7, b"{}", "x" * (MAX_STREAM_BYTES + 1)), 7) == (None, b"{}")
    assert decode_record(encode_record(7, b"{}", "é" * 100), 7) == ("é" * 100, b"{}")
    assert decode_record(encode_record_v1(7, b"{}"), 7) == (None, b"{}")
    assert decode_record(encode_record_v1(7, b"{}"), 8) is None
    assert len(encode_record_v1(7, b"{}")) == REC_HDR_SIZE + 2


def test_scan_reads_both_versions_in_one_segment() -> None:
    frames = [encode_record_v1(5, b"a"), encode_record(6, b"b", "s"), encode_record_v1(7, b"c")]
    data = encode_segment_header(5, 4) + b"".join(frames)
    res = scan_segment(data, 5)
    assert list(res.seqs) == [5, 6, 7] and not res.bad


def test_stream_names_are_kept_not_parsed(tmp_path: Path) -> None:
    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            # the name given wins over the payload: the producer socket already parsed it
            await buf.append_many([b"not json", payload("a", 2)], ["logs", "named"])
            await buf.append(payload("metrics", 3))  # no name given: found in the payload
            await buf.append(b"[1]")
            await buf.append(payload(None, 5), "x" * 300)  # too long to keep: parsed on read
            got = buf.read(0, 10, 1 << 20)
            assert [(r.seq, r.stream) for r in got] == [
                (1, "logs"),
                (2, "named"),
                (3, "metrics"),
                (4, "default"),
                (5, "default"),
            ]
            with pytest.raises(ValueError, match="2 stream names for 1 records"):
                buf.submit([b"{}"], streams=["a", "b"])

    anyio.run(main)


def write_v1_segment(directory: Path, base: int, payloads: list[bytes]) -> Path:
    """A segment exactly as an agent before version 2 wrote it."""
    path = directory / segment_name(base)
    frames = [encode_record_v1(base + i, p) for i, p in enumerate(payloads)]
    path.write_bytes(encode_segment_header(base, base - 1) + b"".join(frames))
    return path


def test_old_format_segment_recovered_after_upgrade(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = [payload("metrics", 1), payload(None, 2), b"opaque", payload("logs", 4)]
    write_v1_segment(tmp_path, 1, old)
    # a torn version-1 record at the end of the newest segment is still trimmed
    newest = write_v1_segment(tmp_path, 5, [payload("late", 5)])
    newest.write_bytes(newest.read_bytes() + encode_record_v1(6, b'{"torn":1}')[:12])

    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            assert buf.stats().corrupt_records == 0 and buf.stats().trimmed_bytes == 12
            assert buf.next_seq >= 7
            got = buf.read(0, 100, 1 << 20)
            assert got == [
                Record(1, old[0], "metrics"),
                Record(2, old[1], "default"),
                Record(3, b"opaque", "default"),
                Record(4, old[3], "logs"),
                Record(5, payload("late", 5), "late"),
            ]
            seq = await buf.append(payload("new", 9), "new")  # written in version 2
            assert buf.read(seq, 10, 1 << 20) == [Record(seq, payload("new", 9), "new")]
            await buf.ack(4)
            await buf.flush_ack()

    with caplog.at_level(logging.WARNING):
        anyio.run(main)

    async def reopen() -> None:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            assert [(r.seq, r.stream) for r in buf.read(0, 100, 1 << 20)] == [
                (5, "late"),
                (buf.next_seq - 1, "new"),
            ]
            assert buf.stats().corrupt_records == 0

    anyio.run(reopen)


def test_damaged_old_record_is_counted(tmp_path: Path) -> None:
    path = write_v1_segment(tmp_path, 1, [payload("m", i) for i in range(1, 4)])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x20  # the payload of record 3, not the newest segment's tail framing
    path.write_bytes(bytes(data))
    (tmp_path / segment_name(4)).write_bytes(encode_segment_header(4, 3))

    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            assert buf.stats().corrupt_records == 1
            assert [r.seq for r in buf.read(0, 10, 1 << 20)] == [1, 2]

    anyio.run(main)


def test_wait_durable_wakes_on_commit_not_on_a_timer(tmp_path: Path) -> None:
    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            woke = anyio.Event()

            async def waiter() -> None:
                await buf.wait_durable(buf.durable_seq)
                woke.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                assert not woke.is_set()
                pending = buf.submit([b"{}"], streams=["s"])
                assert not woke.is_set()  # written, not yet durable
                with anyio.fail_after(5):
                    await pending.wait()
                    await woke.wait()
            assert buf.durable_seq == 1
            with anyio.fail_after(1):
                await buf.wait_durable(0)  # already durable: returns at once

    anyio.run(main)


def test_stream_of() -> None:
    assert stream_of(b'{"stream":"m"}') == "m"
    assert stream_of(b'{"stream":""}') == "default"
    assert stream_of(b'{"stream":3}') == "default"
    assert stream_of(b"[]") == "default"
    assert stream_of(b"\xff") == "default"
