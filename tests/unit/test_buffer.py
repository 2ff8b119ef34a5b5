"""Telemetry buffer: framing, group commit, bounds, acknowledgement and recovery."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio
import pytest

from agent.telemetry.buffer import (
    BufferConfig,
    BufferFull,
    FullPolicy,
    Record,
    RecordTooLarge,
    TelemetryBuffer,
)
from agent.telemetry.segments import (
    REC_HDR_SIZE,
    SEG_HDR_SIZE,
    encode_record,
    encode_segment_header,
    scan_segment,
    segment_name,
    stream_field,
)
from margo_stream.errors import ConfigError, TelemetryBufferError

SMALL = BufferConfig(max_bytes=8192, segment_bytes=1024, max_record_bytes=256)


def run(fn, *args):
    return anyio.run(fn, *args)


def test_scan_segment_reports_damage_without_reordering() -> None:
    frames = [encode_record(10 + i, b'{"i":%d}' % i) for i in range(5)]
    data = bytearray(encode_segment_header(10, 9) + b"".join(frames))
    # damage the payload of record 11 and the header (length field) of record 13
    off11 = SEG_HDR_SIZE + len(frames[0]) + REC_HDR_SIZE
    data[off11] ^= 0xFF
    off13 = SEG_HDR_SIZE + sum(len(f) for f in frames[:3]) + 3
    data[off13] ^= 0x01
    res = scan_segment(bytes(data), 10)
    assert list(res.seqs) == [10, 12, 14]
    assert [(r.seq, r.records) for r in res.bad] == [(11, 1), (None, 1)]
    assert res.max_seq_seen == 14


def test_append_read_ack_and_restart(tmp_path: Path) -> None:
    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            assert (buf.first_seq, buf.next_seq, buf.acked_seq) == (1, 1, 0)
            assert await buf.append(b'{"a":1}') == 1
            assert await buf.append_many([b"x" * 100] * 20) == list(range(2, 22))
            recs = buf.read(1, max_records=3, max_bytes=1 << 20)
            assert recs == [Record(1, b'{"a":1}'), Record(2, b"x" * 100), Record(3, b"x" * 100)]
            assert [r.seq for r in buf.read(5, 100, 250)] == [5, 6]  # byte budget
            assert [r.seq for r in buf.read(5, 100, 10)] == [5]  # at least one record
            assert len(buf.stats().__slots__) > 5 and buf.stats().segments > 1
            await buf.ack(15)
            assert buf.first_seq == 16 and buf.read(0, 100, 1 << 20)[0].seq == 16
            st = buf.stats()
            assert st.records_retained == 6 and st.acked_seq == 15
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            assert buf.acked_seq == 15 and buf.next_seq == 22 and buf.first_seq == 16
            assert await buf.append(b"{}") == 22
            await buf.ack(22)
            assert buf.read(0, 100, 1 << 20) == []
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            assert buf.next_seq == 23 and buf.first_seq == 23
            assert buf.stats().records_retained == 0
        assert len(list(tmp_path.glob("seg-*.log"))) == 1

    run(main)


def test_record_size_limit_and_config_check(tmp_path: Path) -> None:
    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            with pytest.raises(RecordTooLarge, match="exceeds the 256-byte record limit"):
                await buf.append(b"x" * 257)
            assert await buf.append(b"x" * 256) == 1

    run(main)
    with pytest.raises(ConfigError, match="too small"):
        BufferConfig(max_bytes=1000, max_record_bytes=1024).resolved_segment_bytes()


def test_full_buffer_drop_oldest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            seqs = [await buf.append(b"%05d" % i + b"y" * 195) for i in range(200)]
            st = buf.stats()
            assert st.bytes_used <= st.max_bytes
            assert st.dropped_records > 0
            assert st.dropped_records + st.records_retained == 200
            got = buf.read(0, 1000, 1 << 30)
            assert [r.seq for r in got] == seqs[-len(got) :]  # newest kept, in order
            assert st.first_seq == got[0].seq
            assert sum(os.path.getsize(p) for p in tmp_path.glob("seg-*.log")) == st.bytes_used

    with caplog.at_level(logging.WARNING):
        run(main)
    assert "dropped" in caplog.text


def test_full_buffer_reject(tmp_path: Path) -> None:
    cfg = BufferConfig(
        max_bytes=8192, segment_bytes=1024, max_record_bytes=256, policy=FullPolicy.REJECT
    )

    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path, cfg) as buf:
            stored = []
            with pytest.raises(BufferFull, match="policy reject"):
                for i in range(200):
                    stored.append(await buf.append(b"%05d" % i + b"y" * 195))
            assert buf.stats().rejected_records == 1
            with pytest.raises(BufferFull):
                await buf.append_many([b"z" * 200] * 3)
            st = buf.stats()
            assert st.rejected_records == 4 and st.dropped_records == 0
            assert [r.seq for r in buf.read(0, 1000, 1 << 30)] == stored
            await buf.ack(stored[len(stored) // 2])  # frees acknowledged segments
            assert await buf.append(b"after") == stored[-1] + 1

    run(main)


def test_torn_tail_trimmed_and_corruption_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def write() -> list[int]:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            return await buf.append_many([b"r%03d" % i for i in range(30)], ["s"] * 30)

    seqs = run(write)
    (seg,) = sorted(tmp_path.glob("seg-*.log"))
    data = bytearray(seg.read_bytes())
    frame = REC_HDR_SIZE + len(stream_field("s")) + 4
    data[SEG_HDR_SIZE + 5 * frame + REC_HDR_SIZE + 2] ^= 0x55  # payload of seq 6
    seg.write_bytes(bytes(data) + encode_record(31, b"torn-record")[:15])

    async def reopen() -> None:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            st = buf.stats()
            assert st.corrupt_records == 1 and st.trimmed_bytes == 15
            assert buf.next_seq >= 32  # never reuse a number the torn bytes might have held
            got = [r.seq for r in buf.read(0, 100, 1 << 20)]
            assert got == [s for s in seqs if s != 6]

    with caplog.at_level(logging.WARNING):
        run(reopen)
    assert "trimmed torn tail of 15 bytes" in caplog.text
    assert f"{seg.name}: corrupt record(s) at offset {SEG_HDR_SIZE + 5 * frame}" in caplog.text


def test_corruption_found_on_read_is_counted(tmp_path: Path) -> None:
    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            await buf.append_many([b"abc", b"def", b"ghi"])
            seg = buf._segments[-1]
            os.pwrite(seg.fd, b"X", seg.offsets[1] + REC_HDR_SIZE)
            assert [r.payload for r in buf.read(0, 10, 1000)] == [b"abc", b"ghi"]
            assert buf.stats().corrupt_records == 1
            assert buf.stats().records_retained == 2

    run(main)


def test_closed_buffer_refuses(tmp_path: Path) -> None:
    async def main() -> TelemetryBuffer:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            pass
        return buf

    buf = run(main)
    with pytest.raises(TelemetryBufferError, match="closed"):
        buf.submit([b"x"])


def test_a_segment_killed_before_its_header_was_written_is_replaced(tmp_path: Path) -> None:
    """Seen under load in the SIGKILL test: the agent died between creating the next segment
    file and writing its header. Recovery set that empty file aside as obsolete but created
    the new active segment under the same name before deleting it: File exists."""

    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            assert await buf.append_many([b"x" * 100] * 5) == [1, 2, 3, 4, 5]
        (tmp_path / segment_name(6)).write_bytes(b"")  # the roll that died before its header
        async with TelemetryBuffer.open(tmp_path, SMALL) as buf:
            assert buf.next_seq == 6
            assert await buf.append(b"{}") == 6
            assert [r.seq for r in buf.read(0, 100, 1 << 20)] == [1, 2, 3, 4, 5, 6]
        assert not list(tmp_path.glob(".*.tmp-*"))

    run(main)
