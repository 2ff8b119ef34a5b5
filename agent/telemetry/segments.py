"""On-disk framing of the telemetry buffer: segment files, record frames and the recovery scan.

Theory of operation
-------------------
The buffer is a directory of segment files named ``seg-<base_seq:020d>.log``. A segment starts
with a 20-byte header and holds records with consecutive sequence numbers, appended in order::

    segment header  = magic "MSTLSEG1" (8) | base_seq u64 | prev_last u64
                      | crc32 of the first 24 bytes u32
    record frame    = magic (2) | length u32 | seq u64 | body crc32 u32
                      | header crc32 u32 (over the 18 bytes before it) | body (length bytes)
    body, magic F5 A8 (version 2, written now)
                    = stream name length u8 | stream name (UTF-8) | payload
    body, magic F5 A7 (version 1, written before stream names were kept)
                    = payload

The record's version is in its magic, so one segment may hold both (a buffer written by an
older agent keeps being read, and drained, after an upgrade); everything that frames, scans or
counts records treats the body as opaque bytes and works the same on both. A version-2 record
keeps its stream name so replay never parses a payload to find it; a name longer than
``MAX_STREAM_BYTES`` is stored as length 0 and, like every version-1 record, found in the
payload's JSON when the record is read (``streams.stream_of``).

``base_seq`` is the first sequence number the segment was created to hold; an empty segment
still remembers it, so the newest segment alone proves which numbers were already handed out.
``prev_last`` is the highest sequence number the older segments can hold when this one is
created, so damage at the very end of a sealed segment is counted exactly, even across the gap
a recovery may leave.
Both record magics start with 0xF5, a byte that never occurs in UTF-8 text, so the resync scan
after a damaged header cannot lock onto JSON payload bytes; the separate header checksum tells
a damaged length field (framing lost: scan forward for the next valid frame) from a damaged
payload (framing intact: step over exactly one record).

``scan_segment`` is pure: it takes the bytes of one segment and reports valid records and bad
regions. Deciding whether a bad region at the end of the newest segment is a torn tail (trim
it) or corruption (count it) is the caller's job.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path

SEGMENT_MAGIC = b"MSTLSEG1"
RECORD_MAGIC = b"\xf5\xa8"  # version 2: the body starts with the stream name
RECORD_MAGIC_V1 = b"\xf5\xa7"  # version 1: the body is the payload
_MAGICS = (RECORD_MAGIC, RECORD_MAGIC_V1)
MAX_STREAM_BYTES = 255
SEGMENT_HEADER = struct.Struct("<8sQQI")
RECORD_HEADER = struct.Struct("<2sIQII")
SEG_HDR_SIZE = SEGMENT_HEADER.size  # 28
REC_HDR_SIZE = RECORD_HEADER.size  # 22
_HDR_CRC_SPAN = REC_HDR_SIZE - 4
# A length field larger than this is certainly damage, whatever the configured limit.
LENGTH_SANITY = 16 * 1024 * 1024
SEGMENT_NAME = re.compile(r"^seg-(\d{20})\.log$")


def segment_name(base_seq: int) -> str:
    return f"seg-{base_seq:020d}.log"


def encode_segment_header(base_seq: int, prev_last: int) -> bytes:
    head = SEGMENT_MAGIC + struct.pack("<QQ", base_seq, prev_last)
    return head + struct.pack("<I", zlib.crc32(head))


def decode_segment_header(data: bytes) -> tuple[int, int] | None:
    """(base_seq, prev_last) of a segment header, or None if it is missing or damaged."""
    if len(data) < SEG_HDR_SIZE:
        return None
    magic, base, prev_last, crc = SEGMENT_HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC or zlib.crc32(data[: SEG_HDR_SIZE - 4]) != crc:
        return None
    return base, prev_last


def stream_field(stream: str | None) -> bytes:
    """The stream-name prefix of a version-2 body (length 0: find the name in the payload)."""
    if stream is None:
        return b"\x00"
    name = stream.encode()
    if not name or len(name) > MAX_STREAM_BYTES:
        return b"\x00"
    return bytes((len(name),)) + name


def encode_frame(seq: int, body: bytes, magic: bytes = RECORD_MAGIC) -> bytes:
    """Frame one record body: header with both checksums, then the body."""
    head = struct.pack("<2sIQI", magic, len(body), seq, zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + body


def encode_record(seq: int, payload: bytes, stream: str | None = None) -> bytes:
    """A version-2 record frame."""
    return encode_frame(seq, stream_field(stream) + payload)


def encode_record_v1(seq: int, payload: bytes) -> bytes:
    """A version-1 record frame (no stream name), as agents before version 2 wrote them."""
    return encode_frame(seq, payload, RECORD_MAGIC_V1)


def decode_record(frame: bytes | memoryview, expect_seq: int) -> tuple[str | None, bytes] | None:
    """``(stream name or None, payload)`` if ``frame`` is an intact record for ``expect_seq``.

    The name is None for a version-1 record and for one stored without its name."""
    if len(frame) < REC_HDR_SIZE:
        return None
    magic, length, seq, pcrc, hcrc = RECORD_HEADER.unpack_from(frame, 0)
    if (
        magic not in _MAGICS
        or seq != expect_seq
        or zlib.crc32(frame[:_HDR_CRC_SPAN]) != hcrc
        or len(frame) != REC_HDR_SIZE + length
    ):
        return None
    body = bytes(frame[REC_HDR_SIZE:])
    if zlib.crc32(body) != pcrc:
        return None
    if magic == RECORD_MAGIC_V1:
        return None, body
    n = body[0] if body else -1
    if n < 0 or 1 + n > len(body):
        return None
    if n == 0:
        return None, body[1:]
    try:
        return body[1 : 1 + n].decode(), body[1 + n :]
    except UnicodeDecodeError:
        return None


@dataclass(slots=True)
class BadRegion:
    """Bytes ``[start, end)`` of a segment that hold no valid record.

    ``seq`` is the sequence number from an intact header whose payload is damaged or cut
    short; ``None`` when the header itself is unreadable. ``records`` estimates how many
    records the region destroyed (from the gap between the valid sequence numbers around it).
    """

    start: int
    end: int
    seq: int | None
    records: int
    prev_seq: int


@dataclass(slots=True)
class ScanResult:
    seqs: array = field(default_factory=lambda: array("Q"))
    offsets: array = field(default_factory=lambda: array("Q"))
    lengths: array = field(default_factory=lambda: array("I"))
    bad: list[BadRegion] = field(default_factory=list)
    max_seq_seen: int = 0  # highest seq in any intact header, valid payload or not
    valid_end: int = SEG_HDR_SIZE  # offset just past the last valid record


def _header_at(data: bytes, off: int) -> tuple[int, int, int] | None:
    """(length, seq, payload crc) of an intact record header at ``off``, else None."""
    if len(data) - off < REC_HDR_SIZE or data[off : off + 2] not in _MAGICS:
        return None
    _magic, length, seq, pcrc, hcrc = RECORD_HEADER.unpack_from(data, off)
    if zlib.crc32(data[off : off + _HDR_CRC_SPAN]) != hcrc or length > LENGTH_SANITY:
        return None
    return length, seq, pcrc


def _resync(data: bytes, start: int, after_seq: int) -> int:
    """Offset of the next fully valid record at or after ``start``; len(data) if none."""
    pos = start
    while True:
        pos = data.find(b"\xf5", pos)  # the first byte of both magics
        if pos < 0:
            return len(data)
        hdr = _header_at(data, pos)
        if hdr is not None:
            length, seq, pcrc = hdr
            end = pos + REC_HDR_SIZE + length
            if (
                seq > after_seq
                and end <= len(data)
                and zlib.crc32(data[pos + REC_HDR_SIZE : end]) == pcrc
            ):
                return pos
        pos += 1


def scan_segment(data: bytes, base_seq: int) -> ScanResult:
    """Parse every record of a segment (``data`` includes the segment header)."""
    res = ScanResult()
    n = len(data)
    off = SEG_HDR_SIZE
    last = base_seq - 1  # last seq accounted for (valid, or damaged with a readable header)
    while off < n:
        hdr = _header_at(data, off)
        if hdr is None:
            nxt = _resync(data, off + 1, last)
            if nxt < n:
                next_seq = RECORD_HEADER.unpack_from(data, nxt)[2]
                lost = max(1, next_seq - last - 1)
            else:
                lost = 1
            res.bad.append(BadRegion(off, nxt, None, lost, last))
            off = nxt
            continue
        length, seq, pcrc = hdr
        end = off + REC_HDR_SIZE + length
        res.max_seq_seen = max(res.max_seq_seen, seq)
        if end > n:
            res.bad.append(BadRegion(off, n, seq, 1, last))
            break
        if seq <= last or zlib.crc32(data[off + REC_HDR_SIZE : end]) != pcrc:
            res.bad.append(BadRegion(off, end, seq if seq > last else None, 1, last))
            last = max(last, seq)
            off = end
            continue
        res.seqs.append(seq)
        res.offsets.append(off)
        res.lengths.append(length)
        res.valid_end = end
        last = seq
        off = end
    return res


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """Segment files of ``directory`` as (base seq from the name, path), oldest first."""
    found = []
    for entry in os.scandir(directory):
        m = SEGMENT_NAME.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), Path(entry.path)))
    found.sort()
    return found


class Segment:
    """One open segment file and the in-memory index of its valid records.

    The index costs 20 bytes a record (three flat arrays), not a Python object per record.
    """

    __slots__ = (
        "path",
        "base_seq",
        "fd",
        "size",
        "durable_size",
        "seqs",
        "offsets",
        "lengths",
        "bad_seqs",
        "sealed",
        "retired",
    )

    def __init__(self, path: Path, base_seq: int, fd: int, size: int) -> None:
        self.path = path
        self.base_seq = base_seq
        self.fd = fd
        self.size = size
        self.durable_size = size
        self.seqs = array("Q")
        self.offsets = array("Q")
        self.lengths = array("I")
        self.bad_seqs: set[int] = set()  # indexed records found damaged when read
        self.sealed = False
        self.retired = False

    @classmethod
    def create(
        cls, directory: Path, base_seq: int, prev_last: int, *, replace: bool = False
    ) -> Segment:
        """Create a new empty segment (not yet fsynced). Raises OSError, leaving no file.

        With ``replace`` a file of that name (one recovery found useless, such as a segment
        whose header was never written) is replaced at once: the header is written under a
        temporary name first, so the name is never missing in between."""
        path = directory / segment_name(base_seq)
        target = path.with_name(f".{path.name}.tmp-new") if replace else path
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
        fd = os.open(target, flags, 0o640)
        try:
            header = encode_segment_header(base_seq, prev_last)
            if os.write(fd, header) != len(header):
                raise OSError(28, "short write of segment header")
            if replace:
                os.replace(target, path)
        except BaseException:
            os.close(fd)
            target.unlink(missing_ok=True)
            raise
        return cls(path, base_seq, fd, SEG_HDR_SIZE)

    @property
    def count(self) -> int:
        return len(self.seqs)

    @property
    def last_seq(self) -> int | None:
        return self.seqs[-1] if self.seqs else None
