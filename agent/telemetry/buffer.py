"""The agent's durable, bounded offline telemetry buffer.

Theory of operation
-------------------
Records are appended to the newest segment (see ``segments.py`` for the framing) with one
``pwrite`` per call, straight into the page cache, on the event loop. Durability is a *group
commit*: a committer task waits a short window (``commit_window_s``, default 2 ms, or until
``commit_max_records`` are pending), takes a snapshot of everything written so far, fsyncs the
touched segment files (and the directory, if a segment was created) in a worker thread, then
wakes every appender of that round. ``append`` returns the sequence number only after that.

Sequence numbers start at 1, grow by one per stored record and are never reused: a write that
fails consumes no number, and recovery sets ``next_seq`` above every number any surviving byte
can prove was handed out (newest segment's base, highest intact header, acknowledged mark, and
a bound on how many records a damaged tail could have held). Numbers may have gaps (dropped,
corrupt or trimmed records), never repeats.

Bounds: ``bytes_used`` (all segment files) never exceeds ``max_bytes``. When a record does not
fit, ``drop-oldest`` deletes the oldest segments (rolling the active one first if it is the only
one), counting unacknowledged records lost in ``dropped_records``; ``reject`` refuses the record
with ``BufferFull`` and counts ``rejected_records``.

Acknowledgements move ``acked_seq`` in memory at once, delete segments wholly at or below it,
and persist the mark to ``ack.json`` (atomically) at most every ``ack_flush_s``. Losing the
latest mark in a crash only means a few acknowledged records are replayed again; the newest
segment is never deleted, so next_seq never depends on the ack file.

An fsync failure leaves the kernel's page state unknowable, so the buffer stops accepting
appends (reads still work) until it is reopened and the recovery scan checks every checksum.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import errno
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from agent.telemetry.segments import (
    REC_HDR_SIZE,
    SEG_HDR_SIZE,
    Segment,
    decode_record,
    decode_segment_header,
    encode_record,
    list_segments,
    scan_segment,
)
from margo_stream.errors import ConfigError, TelemetryBufferError
from margo_stream.fsutil import atomic_write, fsync_dir

log = logging.getLogger(__name__)

ACK_FILE = "ack.json"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_RECORD = 64 * 1024


class FullPolicy(enum.Enum):
    DROP_OLDEST = "drop-oldest"
    REJECT = "reject"


class RecordTooLarge(TelemetryBufferError):
    """A record is larger than the buffer's record size limit."""


class BufferFull(TelemetryBufferError):
    """The buffer is at ``max_bytes`` and its policy is ``reject``."""


class BufferIOError(TelemetryBufferError):
    """The disk refused a write or an fsync (disk full, file size limit, I/O error)."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


class BufferClosed(TelemetryBufferError):
    """The buffer is closed."""


def describe_oserror(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "disk full (ENOSPC)"
    if exc.errno == errno.EFBIG:
        return "file size limit exceeded (EFBIG)"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded (EDQUOT)"
    name = errno.errorcode.get(exc.errno or 0, "?")
    return f"{exc.strerror or exc} ({name})"


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class BufferConfig:
    max_bytes: int = DEFAULT_MAX_BYTES
    policy: FullPolicy = FullPolicy.DROP_OLDEST
    max_record_bytes: int = DEFAULT_MAX_RECORD
    segment_bytes: int | None = None  # default: max_bytes / 8, capped at 16 MiB
    commit_window_s: float = 0.002
    commit_max_records: int = 4096
    ack_flush_s: float = 0.5

    def resolved_segment_bytes(self) -> int:
        frame_max = REC_HDR_SIZE + self.max_record_bytes
        if self.max_bytes < 2 * (SEG_HDR_SIZE + frame_max):
            raise ConfigError(
                f"--buffer-max-bytes {self.max_bytes} is too small for records of up to "
                f"{self.max_record_bytes} bytes; use at least {2 * (SEG_HDR_SIZE + frame_max)}"
            )
        seg = self.segment_bytes or min(16 * 1024 * 1024, self.max_bytes // 8)
        return max(seg, SEG_HDR_SIZE + frame_max)


@dataclass(frozen=True, slots=True)
class BufferStats:
    bytes_used: int
    max_bytes: int
    records_retained: int
    dropped_records: int
    rejected_records: int
    corrupt_records: int
    trimmed_bytes: int
    first_seq: int
    next_seq: int
    acked_seq: int
    durable_seq: int
    segments: int
    fill_ratio: float


class _Round:
    """One group commit: every appender that wrote before its snapshot waits on it."""

    __slots__ = ("event", "error")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.error: TelemetryBufferError | None = None


class PendingAppend:
    """Records written (not yet durable) by ``TelemetryBuffer.submit``."""

    __slots__ = ("seqs", "_round")

    def __init__(self, seqs: range, round_: _Round) -> None:
        self.seqs = seqs
        self._round = round_

    async def wait(self) -> range:
        """Wait until the records are durable; raises ``BufferIOError`` if the fsync failed."""
        await self._round.event.wait()
        if self._round.error is not None:
            raise self._round.error
        return self.seqs


def _fsync_all(fds: list[int], directory: Path | None) -> None:
    for fd in fds:
        os.fsync(fd)
    if directory is not None:
        fsync_dir(directory)


class TelemetryBuffer:
    """Use ``async with TelemetryBuffer.open(directory, config) as buf``."""

    def __init__(self, directory: Path, config: BufferConfig) -> None:
        self.directory = directory
        self.config = config
        self._segment_bytes = config.resolved_segment_bytes()
        self._segments: list[Segment] = []
        self._bases: list[int] = []  # base_seq of each segment, for bisect
        self._next_seq = 1
        self._durable_seq = 0
        self._acked_seq = 0
        self._ack_persisted = 0
        self._bytes_used = 0
        self.dropped_records = 0
        self.rejected_records = 0
        self.corrupt_records = 0
        self.trimmed_bytes = 0
        self._dirty: dict[Segment, None] = {}
        self._dir_dirty = False
        self._syncing: list[Segment] = []
        self._pending_records = 0
        self._round_started = 0.0
        self._round = _Round()
        self._wake = anyio.Event()
        self._batch_full = anyio.Event()
        self._ack_wake = anyio.Event()
        self._ack_lock = anyio.Lock()
        self._closing = False
        self._closed = False
        self._failed: BufferIOError | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, directory: Path, config: BufferConfig | None = None
    ) -> AsyncIterator[TelemetryBuffer]:
        buf = cls(Path(directory), config or BufferConfig())
        await anyio.to_thread.run_sync(buf._recover)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(buf._committer)
                tg.start_soon(buf._ack_flusher)
                try:
                    yield buf
                finally:
                    buf._closing = True
                    buf._wake.set()
                    buf._ack_wake.set()
        finally:
            buf._closed = True
            for seg in buf._segments:
                buf._close_fd(seg)

    def _recover(self) -> None:
        """Scan the directory, trim a torn tail, count corruption, restore the counters."""
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        for stray in d.glob(".*.tmp-*"):
            stray.unlink(missing_ok=True)
        floor = self._load_ack()
        acked = self._acked_seq
        found = list_segments(d)
        next_seq = max(1, acked + 1, floor)
        keep: list[Segment] = []
        obsolete: list[Path] = []
        reuse: Segment | None = None
        last_present = acked
        for i, (name_base, path) in enumerate(found):
            is_last = i == len(found) - 1
            if not is_last and found[i + 1][0] - 1 <= acked:
                obsolete.append(path)  # wholly acknowledged
                continue
            data = path.read_bytes()
            header = decode_segment_header(data)
            if header is None:
                log.warning("telemetry segment %s: damaged header; using the base in its name", path.name)
                base = name_base
            else:
                base = header[0]
            next_seq = max(next_seq, base)
            scan = scan_segment(data, base)
            next_seq = max(next_seq, scan.max_seq_seen + 1)
            if is_last and len(data) > scan.valid_end >= SEG_HDR_SIZE:
                # Everything after the newest segment's last valid record is a torn tail: a
                # crash can persist the pages of an unsynced batch in any order.
                tail = [r for r in scan.bad if r.start >= scan.valid_end]
                scan.bad = [r for r in scan.bad if r.start < scan.valid_end]
                cut = len(data) - scan.valid_end
                known = [r.seq for r in tail if r.seq is not None]
                log.warning(
                    "telemetry segment %s: trimmed torn tail of %d bytes at offset %d%s",
                    path.name, cut, scan.valid_end,
                    f" (partial record(s) seq {known})" if known else "",
                )
                if any(r.seq is None for r in tail):
                    # Unknown framing: never reuse a number such bytes could have held.
                    next_seq = max(next_seq, tail[0].prev_seq + 2 + cut // REC_HDR_SIZE)
                with open(path, "r+b") as fh:
                    fh.truncate(scan.valid_end)
                    os.fsync(fh.fileno())
                self.trimmed_bytes += cut
                data = data[: scan.valid_end]
            elif not is_last and scan.bad and scan.bad[-1].end == len(data) and scan.bad[-1].seq is None:
                # Damage up to the end of a sealed segment: the next segment's header says
                # which numbers this one held.
                tail = scan.bad[-1]
                nxt = decode_segment_header(found[i + 1][1].read_bytes()[:SEG_HDR_SIZE])
                tail.records = max(1, nxt[1] - tail.prev_seq) if nxt else 1
            live_bad = []
            for region in scan.bad:
                first = region.seq if region.seq is not None else region.prev_seq + 1
                lost = first + region.records - 1 - max(first - 1, acked)
                if lost <= 0:
                    continue
                live_bad.append(region)
                self.corrupt_records += lost
                log.error(
                    "telemetry segment %s: corrupt record(s) at offset %d (%d bytes, seq %s); "
                    "counted %d unacknowledged record(s) as lost",
                    path.name, region.start, region.end - region.start,
                    region.seq if region.seq is not None else f"unknown, after {region.prev_seq}",
                    lost,
                )
            live = bool(scan.seqs) and scan.seqs[-1] > acked
            if (
                is_last and header is not None and not scan.seqs and not scan.bad
                and base == next_seq == name_base
            ):
                reuse = Segment(path, base, os.open(path, os.O_RDWR), len(data))
                continue
            if not live and not live_bad:
                obsolete.append(path)
                continue
            seg = Segment(path, base, os.open(path, os.O_RDWR), len(data))
            seg.seqs, seg.offsets, seg.lengths = scan.seqs, scan.offsets, scan.lengths
            seg.sealed = True
            keep.append(seg)
            present = scan.seqs[-1] if scan.seqs else 0
            for region in scan.bad:
                present = max(present, region.seq or 0, region.prev_seq + region.records)
            last_present = max(last_present, present)
        self._next_seq = next_seq
        self._durable_seq = next_seq - 1
        if reuse is not None:
            active = reuse
        else:
            active = Segment.create(d, next_seq, last_present)
            os.fsync(active.fd)
            fsync_dir(d)
        for path in obsolete:
            path.unlink(missing_ok=True)
        if obsolete:
            fsync_dir(d)
        self._segments = [*keep, active]
        self._bases = [s.base_seq for s in self._segments]
        self._bytes_used = sum(s.size for s in self._segments)
        if self._bytes_used > self.config.max_bytes:
            log.warning(
                "telemetry buffer holds %d bytes, more than max_bytes %d (limit lowered?)",
                self._bytes_used, self.config.max_bytes,
            )
        log.info(
            "telemetry buffer %s opened: next_seq %d, acked %d, %d segment(s), %d bytes",
            d, self._next_seq, self._acked_seq, len(self._segments), self._bytes_used,
        )

    def _load_ack(self) -> int:
        path = self.directory / ACK_FILE
        try:
            doc = json.loads(path.read_bytes())
            self._acked_seq = self._ack_persisted = int(doc["acked_seq"])
            return int(doc.get("next_seq_floor", 0))
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as exc:
            log.error("telemetry ack file %s unreadable (%s); replaying from the start", path, exc)
            return 0

    def _close_fd(self, seg: Segment) -> None:
        if seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1

    # ------------------------------------------------------------------ properties

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def acked_seq(self) -> int:
        return self._acked_seq

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def first_seq(self) -> int:
        """Oldest retained unacknowledged sequence number (``next_seq`` if there is none)."""
        for seg in self._segments:
            i = bisect.bisect_right(seg.seqs, self._acked_seq)
            while i < len(seg.seqs):
                if seg.seqs[i] not in seg.bad_seqs:
                    return seg.seqs[i]
                i += 1
        return self._next_seq

    def stats(self) -> BufferStats:
        retained = 0
        for seg in self._segments:
            i = bisect.bisect_right(seg.seqs, self._acked_seq)
            retained += len(seg.seqs) - i - sum(1 for s in seg.bad_seqs if s > self._acked_seq)
        return BufferStats(
            bytes_used=self._bytes_used,
            max_bytes=self.config.max_bytes,
            records_retained=retained,
            dropped_records=self.dropped_records,
            rejected_records=self.rejected_records,
            corrupt_records=self.corrupt_records,
            trimmed_bytes=self.trimmed_bytes,
            first_seq=self.first_seq,
            next_seq=self._next_seq,
            acked_seq=self._acked_seq,
            durable_seq=self._durable_seq,
            segments=len(self._segments),
            fill_ratio=self._bytes_used / self.config.max_bytes,
        )

    # ------------------------------------------------------------------ appending

    async def append(self, payload: bytes) -> int:
        """Store one record; returns its sequence number once it is durable."""
        pending = self.submit((payload,))
        await pending.wait()
        return pending.seqs.start

    async def append_many(self, payloads: Sequence[bytes]) -> list[int]:
        """Store several records in one write; all or none pass the size and space checks.

        A disk error part way through a batch that spans segments may leave the earlier part
        stored (and replayed later); the exception says the batch as a whole failed.
        """
        if not payloads:
            return []
        pending = self.submit(payloads)
        return list(await pending.wait())

    def submit(self, payloads: Sequence[bytes], *, count_rejected: bool = True) -> PendingAppend:
        """Write records now (no await); ``await result.wait()`` for durability.

        Raises ``RecordTooLarge``, ``BufferFull``, ``BufferIOError`` or ``BufferClosed``
        synchronously, having stored nothing. ``count_rejected=False`` leaves a refusal out
        of ``rejected_records`` (for a caller that retries the records one by one).
        """
        if self._closing or self._closed:
            raise BufferClosed("telemetry buffer is closed")
        if self._failed is not None:
            raise self._failed
        limit = self.config.max_record_bytes
        total = 0
        for p in payloads:
            if len(p) > limit:
                raise RecordTooLarge(
                    f"telemetry record of {len(p)} bytes exceeds the {limit}-byte record limit"
                )
            total += REC_HDR_SIZE + len(p)
        # Room for the frames plus a segment header for every roll the batch could cause.
        needed = total + SEG_HDR_SIZE * (1 + total // self._segment_bytes)
        if needed + SEG_HDR_SIZE > self.config.max_bytes:
            if count_rejected:
                self.rejected_records += len(payloads)
            raise BufferFull(
                f"a batch of {total} bytes cannot fit a {self.config.max_bytes}-byte buffer"
            )
        if self._bytes_used + needed > self.config.max_bytes:
            if self.config.policy is FullPolicy.REJECT:
                if count_rejected:
                    self.rejected_records += len(payloads)
                raise BufferFull(
                    f"telemetry buffer full ({self._bytes_used} of {self.config.max_bytes} "
                    "bytes, policy reject); the controller has not acknowledged older records"
                )
            self._make_room(needed)
        first = self._next_seq
        seq = first
        chunk: list[bytes] = []
        chunk_bytes = 0
        for p in payloads:
            frame_len = REC_HDR_SIZE + len(p)
            if chunk and self._segments[-1].size + chunk_bytes + frame_len > self._segment_bytes:
                self._write_chunk(chunk, seq - len(chunk))
                chunk, chunk_bytes = [], 0
            if not chunk and self._needs_roll(frame_len):
                self._roll()
            chunk.append(p)
            chunk_bytes += frame_len
            seq += 1
        self._write_chunk(chunk, seq - len(chunk))
        n = len(payloads)
        if self._pending_records == 0:
            self._round_started = time.monotonic()
        self._pending_records += n
        if not self._wake.is_set():
            self._wake.set()
        if self._pending_records >= self.config.commit_max_records:
            self._batch_full.set()
        return PendingAppend(range(first, first + n), self._round)

    def _needs_roll(self, frame_len: int) -> bool:
        seg = self._segments[-1]
        return seg.count > 0 and seg.size + frame_len > self._segment_bytes

    def _write_chunk(self, payloads: list[bytes], first_seq: int) -> None:
        seg = self._segments[-1]
        frames = [encode_record(first_seq + i, p) for i, p in enumerate(payloads)]
        data = b"".join(frames)
        start = seg.size
        try:
            view = memoryview(data)
            off = start
            while view:
                written = os.pwrite(seg.fd, view, off)
                view = view[written:]
                off += written
        except OSError as exc:
            self._undo_partial(seg, start)
            raise BufferIOError(
                f"telemetry buffer could not write to {seg.path.name}: {describe_oserror(exc)}",
                exc.errno,
            ) from exc
        off = start
        seqs, offsets, lengths = seg.seqs, seg.offsets, seg.lengths
        for i, p in enumerate(payloads):
            seqs.append(first_seq + i)
            offsets.append(off)
            lengths.append(len(p))
            off += REC_HDR_SIZE + len(p)
        seg.size = off
        self._bytes_used += off - start
        self._next_seq = first_seq + len(payloads)
        self._dirty[seg] = None

    def _undo_partial(self, seg: Segment, size: int) -> None:
        try:
            os.ftruncate(seg.fd, size)
        except OSError as exc:
            # The partial frame stays; pwrite at ``size`` overwrites it, and recovery trims or
            # counts whatever is left. Roll so nothing is appended after unknown bytes.
            log.error("telemetry segment %s: cannot trim a failed write: %s", seg.path.name, exc)
            seg.size = size
            with contextlib.suppress(OSError, BufferIOError):
                self._roll()

    def _roll(self) -> None:
        old = self._segments[-1]
        try:
            new = Segment.create(self.directory, self._next_seq, self._next_seq - 1)
        except FileExistsError:
            # An empty segment with this base already exists (a roll after a failed write).
            raise BufferIOError(f"telemetry segment for seq {self._next_seq} already exists") from None
        except OSError as exc:
            raise BufferIOError(
                f"telemetry buffer could not create a segment: {describe_oserror(exc)}", exc.errno
            ) from exc
        old.sealed = True
        self._dirty[old] = None
        self._dirty[new] = None
        self._dir_dirty = True
        self._segments.append(new)
        self._bases.append(new.base_seq)
        self._bytes_used += new.size

    def _make_room(self, needed: int) -> None:
        """drop-oldest: delete oldest segments until ``needed`` more bytes fit."""
        max_bytes = self.config.max_bytes
        while self._bytes_used + needed > max_bytes:
            if len(self._segments) == 1:
                if self._segments[0].count == 0:
                    return  # nothing left to drop; the size check in config guarantees a fit
                self._roll()
            self._drop(self._segments[0], unacked_only=True)

    def _drop(self, seg: Segment, *, unacked_only: bool) -> None:
        lost = 0
        if unacked_only:
            i = bisect.bisect_right(seg.seqs, self._acked_seq)
            lost = len(seg.seqs) - i - sum(1 for s in seg.bad_seqs if s > self._acked_seq)
        if lost:
            self.dropped_records += lost
            log.warning(
                "telemetry buffer full: dropped %d unacknowledged record(s) (seq %d..%d)",
                lost, seg.seqs[i], seg.seqs[-1],
            )
        self._segments.pop(0)
        self._bases.pop(0)
        self._bytes_used -= seg.size
        seg.retired = True
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            pass
        self._dir_dirty = True
        if seg not in self._dirty and seg not in self._syncing:
            self._close_fd(seg)

    # ------------------------------------------------------------------ group commit

    async def _committer(self) -> None:
        while True:
            await self._wake.wait()
            # The window runs from the round's first write, so writes made while the previous
            # fsync ran have already used part of it.
            remaining = self.config.commit_window_s - (time.monotonic() - self._round_started)
            if (
                remaining > 0
                and self._pending_records < self.config.commit_max_records
                and not self._closing
            ):
                with anyio.move_on_after(remaining):
                    await self._batch_full.wait()
            self._wake = anyio.Event()
            self._batch_full = anyio.Event()
            await self._commit_once()
            if self._closing and not self._dirty and self._pending_records == 0:
                return

    async def _commit_once(self) -> None:
        rnd, self._round = self._round, _Round()
        target = self._next_seq - 1
        segs = list(self._dirty)
        sizes = [s.size for s in segs]
        self._dirty.clear()
        self._pending_records = 0
        directory = self.directory if self._dir_dirty else None
        self._dir_dirty = False
        self._syncing = segs
        try:
            if self._failed is None and (segs or directory is not None):
                await anyio.to_thread.run_sync(_fsync_all, [s.fd for s in segs], directory)
        except OSError as exc:
            self._failed = BufferIOError(
                f"telemetry buffer fsync failed: {describe_oserror(exc)}; appends are refused "
                "until the agent restarts and re-verifies the buffer",
                exc.errno,
            )
            log.error("%s", self._failed)
        finally:
            self._syncing = []
            for seg in segs:
                if seg.retired:
                    self._close_fd(seg)
        if self._failed is None:
            for seg, size in zip(segs, sizes, strict=True):
                seg.durable_size = max(seg.durable_size, size)
            self._durable_seq = max(self._durable_seq, target)
        else:
            rnd.error = self._failed
        rnd.event.set()

    # ------------------------------------------------------------------ reading

    def read(self, from_seq: int, max_records: int = 1000, max_bytes: int = 1 << 20) -> list[Record]:
        """Durable unacknowledged records in order, from the first retained seq >= from_seq.

        Returns at least one record when any is available, even if it alone exceeds
        ``max_bytes``. A record whose checksum fails is logged, counted and left out.
        """
        start = max(from_seq, self._acked_seq + 1)
        limit = self._durable_seq
        out: list[Record] = []
        budget = max_bytes
        k = max(0, bisect.bisect_right(self._bases, start) - 1)
        for seg in self._segments[k:]:
            i = bisect.bisect_left(seg.seqs, start)
            j = i
            n = len(seg.seqs)
            while j < n and seg.seqs[j] <= limit and len(out) + (j - i) < max_records:
                cost = seg.lengths[j]
                if cost > budget and (out or j > i):
                    break
                budget -= cost
                j += 1
            if j > i:
                self._read_range(seg, i, j, out)
            if len(out) >= max_records or budget <= 0 or j < n:
                break
        return out

    def _read_range(self, seg: Segment, i: int, j: int, out: list[Record]) -> None:
        base = seg.offsets[i]
        end = seg.offsets[j - 1] + REC_HDR_SIZE + seg.lengths[j - 1]
        data = os.pread(seg.fd, end - base, base)
        view = memoryview(data)
        for k in range(i, j):
            seq = seg.seqs[k]
            if seq in seg.bad_seqs:
                continue
            off = seg.offsets[k] - base
            payload = decode_record(view[off : off + REC_HDR_SIZE + seg.lengths[k]], seq)
            if payload is None:
                seg.bad_seqs.add(seq)
                self.corrupt_records += 1
                log.error(
                    "telemetry segment %s: corrupt record seq %d at offset %d (checksum failed "
                    "on read); counted and left out",
                    seg.path.name, seq, seg.offsets[k],
                )
                continue
            out.append(Record(seq, payload))

    # ------------------------------------------------------------------ acknowledgement

    async def ack(self, seq: int) -> None:
        """The controller stored everything <= ``seq``: delete wholly acknowledged segments."""
        seq = min(seq, self._durable_seq)
        if seq <= self._acked_seq:
            return
        self._acked_seq = seq
        while len(self._segments) > 1 and self._bases[1] - 1 <= seq:
            self._drop(self._segments[0], unacked_only=False)
        self._ack_wake.set()

    async def _persist_ack(self) -> None:
        async with self._ack_lock:
            value = self._acked_seq
            if value <= self._ack_persisted:
                return
            doc = json.dumps({"acked_seq": value, "next_seq_floor": self._durable_seq + 1})
            try:
                await anyio.to_thread.run_sync(
                    functools.partial(atomic_write, self.directory / ACK_FILE, doc.encode(), mode=0o640)
                )
            except OSError as exc:
                log.warning("telemetry ack mark not persisted: %s", describe_oserror(exc))
                return
            self._ack_persisted = value

    async def _ack_flusher(self) -> None:
        while not self._closing:
            await self._ack_wake.wait()
            self._ack_wake = anyio.Event()
            if not self._closing:
                with anyio.move_on_after(self.config.ack_flush_s):
                    while not self._closing:
                        await self._ack_wake.wait()
                        self._ack_wake = anyio.Event()
            await self._persist_ack()
        await self._persist_ack()

    async def flush_ack(self) -> None:
        """Persist the ack mark now (tests and orderly shutdown)."""
        await self._persist_ack()

