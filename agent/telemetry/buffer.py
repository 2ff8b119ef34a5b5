"""The agent's durable, bounded offline telemetry buffer.

Theory of operation
-------------------
Records are appended to the newest segment (see ``segments.py`` for the framing) with one
``pwrite`` per call, straight into the page cache, on the event loop. Each record keeps its
stream name beside the payload (given by the caller, or found in the payload once, when it is
appended), so reading it back never parses the payload. Durability is a *group
commit* (``commit.py``): a committer task waits a short window (``commit_window_s``, default
2 ms, or until ``commit_max_records`` are pending), fsyncs the touched files in a worker thread,
then wakes every appender of that round. ``append`` returns the sequence number only after that.
Each round that makes records durable also wakes ``wait_durable``: replay sleeps there, not on
a timer, when it has sent everything.

Sequence numbers start at 1, grow by one per stored record and are never reused: a write that
fails consumes no number, and the recovery scan on open (``recovery.py``) sets ``next_seq`` above
every number any surviving byte can prove was handed out. Numbers may have gaps (dropped,
corrupt or trimmed records), never repeats.

Bounds: ``bytes_used`` (all segment files) never exceeds ``max_bytes``. When a record does not
fit, ``drop-oldest`` deletes the oldest segments (rolling the active one first if it is the only
one), counting unacknowledged records lost in ``dropped_records``; ``reject`` refuses the record
with ``BufferFull`` and counts ``rejected_records``.

Acknowledgements move ``acked_seq`` in memory at once, delete segments wholly at or below it,
and persist the mark to ``ack.json`` (``ackmark.py``) at most every ``ack_flush_s``. The newest
segment is never deleted, so next_seq never depends on the ack file.

An fsync failure leaves the kernel's page state unknowable, so the buffer stops accepting
appends (reads still work) until it is reopened and the recovery scan checks every checksum.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from agent.telemetry.ackmark import AckMark
from agent.telemetry.commit import GroupCommit, PendingAppend
from agent.telemetry.disk_errors import describe_oserror
from agent.telemetry.recovery import recover
from agent.telemetry.segments import (
    MAX_STREAM_BYTES,
    REC_HDR_SIZE,
    SEG_HDR_SIZE,
    Segment,
    decode_record,
    encode_frame,
    stream_field,
)
from agent.telemetry.streams import DEFAULT_STREAM, stream_of
from margo_stream.errors import ConfigError, TelemetryBufferError

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    payload: bytes
    stream: str = DEFAULT_STREAM


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
        frame_max = REC_HDR_SIZE + 1 + MAX_STREAM_BYTES + self.max_record_bytes
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
        self._bytes_used = 0
        self.dropped_records = 0
        self.rejected_records = 0
        self.corrupt_records = 0
        self.trimmed_bytes = 0
        self._commit = GroupCommit(directory, config.commit_window_s, config.commit_max_records)
        self._acks = AckMark(directory, config.ack_flush_s)
        self._closing = False
        self._closed = False
        self._failed: BufferIOError | None = None
        self._durable_moved = anyio.Event()  # set (and replaced) when durable_seq moves

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
                    buf._commit.close()
                    buf._acks.close()
        finally:
            buf._closed = True
            for seg in buf._segments:
                buf._close_fd(seg)

    def _recover(self) -> None:
        """Scan the directory and restore the counters (see ``recovery.py``)."""
        found = recover(self.directory, self.config.max_bytes)
        self._segments = found.segments
        self._bases = [s.base_seq for s in self._segments]
        self._bytes_used = found.bytes_used
        self._next_seq = found.next_seq
        self._durable_seq = found.next_seq - 1
        self._acked_seq = self._acks.persisted = found.acked_seq
        self.corrupt_records += found.corrupt_records
        self.trimmed_bytes += found.trimmed_bytes

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

    async def append(self, payload: bytes, stream: str | None = None) -> int:
        """Store one record; returns its sequence number once it is durable."""
        pending = self.submit((payload,), streams=None if stream is None else (stream,))
        await pending.wait()
        return pending.seqs.start

    async def append_many(
        self, payloads: Sequence[bytes], streams: Sequence[str] | None = None
    ) -> list[int]:
        """Store several records in one write; all or none pass the size and space checks.

        A disk error part way through a batch that spans segments may leave the earlier part
        stored (and replayed later); the exception says the batch as a whole failed.
        """
        if not payloads:
            return []
        pending = self.submit(payloads, streams=streams)
        return list(await pending.wait())

    def submit(
        self,
        payloads: Sequence[bytes],
        *,
        streams: Sequence[str] | None = None,
        count_rejected: bool = True,
    ) -> PendingAppend:
        """Write records now (no await); ``await result.wait()`` for durability.

        ``streams`` names each record's stream; without it each payload's JSON names it.
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
        if streams is None:
            streams = [stream_of(p) for p in payloads]
        elif len(streams) != len(payloads):
            raise ValueError(f"{len(streams)} stream names for {len(payloads)} records")
        bodies = [stream_field(name) + p for name, p in zip(streams, payloads, strict=True)]
        # Room for the frames, a header for every roll the batch causes, and one header in
        # reserve: reopening the buffer always starts a fresh segment, and even then the files
        # must stay within max_bytes.
        needed = self._space_needed(bodies) + SEG_HDR_SIZE
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
        for p in bodies:
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
        return self._commit.written(range(first, first + len(payloads)))

    def _space_needed(self, bodies: Sequence[bytes]) -> int:
        """Bytes ``bodies`` add to the files: frames plus a header per roll, decided exactly
        as the write loop decides them."""
        seg = self._segments[-1]
        size, count, added = seg.size, seg.count, 0
        for p in bodies:
            frame_len = REC_HDR_SIZE + len(p)
            if count > 0 and size + frame_len > self._segment_bytes:
                size, count = SEG_HDR_SIZE, 0
                added += SEG_HDR_SIZE
            size += frame_len
            count += 1
            added += frame_len
        return added

    def _needs_roll(self, frame_len: int) -> bool:
        seg = self._segments[-1]
        return seg.count > 0 and seg.size + frame_len > self._segment_bytes

    def _write_chunk(self, bodies: list[bytes], first_seq: int) -> None:
        seg = self._segments[-1]
        frames = [encode_frame(first_seq + i, p) for i, p in enumerate(bodies)]
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
        for i, p in enumerate(bodies):
            seqs.append(first_seq + i)
            offsets.append(off)
            lengths.append(len(p))
            off += REC_HDR_SIZE + len(p)
        seg.size = off
        self._bytes_used += off - start
        self._next_seq = first_seq + len(bodies)
        self._commit.dirty[seg] = None

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
            raise BufferIOError(
                f"telemetry segment for seq {self._next_seq} already exists"
            ) from None
        except OSError as exc:
            raise BufferIOError(
                f"telemetry buffer could not create a segment: {describe_oserror(exc)}", exc.errno
            ) from exc
        old.sealed = True
        self._commit.dirty[old] = None
        self._commit.dirty[new] = None
        self._commit.dir_dirty = True
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
                lost,
                seg.seqs[i],
                seg.seqs[-1],
            )
        self._segments.pop(0)
        self._bases.pop(0)
        self._bytes_used -= seg.size
        seg.retired = True
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            pass
        self._commit.dir_dirty = True
        if not self._commit.in_flight(seg):
            self._close_fd(seg)

    # ------------------------------------------------------------------ group commit

    async def _committer(self) -> None:
        commit = self._commit
        while True:
            await commit.gather()
            await self._commit_once()
            if commit.closing and commit.idle:
                return

    async def _commit_once(self) -> None:
        target = self._next_seq - 1
        rnd, exc = await self._commit.sync_round(
            skip=self._failed is not None, close_fd=self._close_fd
        )
        if exc is not None:
            self._failed = BufferIOError(
                f"telemetry buffer fsync failed: {describe_oserror(exc)}; appends are refused "
                "until the agent restarts and re-verifies the buffer",
                exc.errno,
            )
            log.error("%s", self._failed)
        if self._failed is None:
            if target > self._durable_seq:
                self._durable_seq = target
                self._durable_moved.set()
                self._durable_moved = anyio.Event()
        else:
            rnd.error = self._failed
        rnd.event.set()

    # ------------------------------------------------------------------ reading

    def read(
        self, from_seq: int, max_records: int = 1000, max_bytes: int = 1 << 20
    ) -> list[Record]:
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

    async def wait_durable(self, beyond: int) -> None:
        """Return once a record above ``beyond`` is durable (at once if one already is)."""
        while self._durable_seq <= beyond:
            await self._durable_moved.wait()

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
            record = decode_record(view[off : off + REC_HDR_SIZE + seg.lengths[k]], seq)
            if record is None:
                seg.bad_seqs.add(seq)
                self.corrupt_records += 1
                log.error(
                    "telemetry segment %s: corrupt record seq %d at offset %d (checksum failed "
                    "on read); counted and left out",
                    seg.path.name,
                    seq,
                    seg.offsets[k],
                )
                continue
            stream, payload = record
            out.append(Record(seq, payload, stream_of(payload) if stream is None else stream))

    # ------------------------------------------------------------------ acknowledgement

    async def ack(self, seq: int) -> None:
        """The controller stored everything <= ``seq``: delete wholly acknowledged segments."""
        seq = min(seq, self._durable_seq)
        if seq <= self._acked_seq:
            return
        self._acked_seq = seq
        while len(self._segments) > 1 and self._bases[1] - 1 <= seq:
            self._drop(self._segments[0], unacked_only=False)
        self._acks.moved()

    def _ack_mark(self) -> tuple[int, int]:
        return self._acked_seq, self._durable_seq + 1

    async def _ack_flusher(self) -> None:
        await self._acks.run(self._ack_mark)

    async def flush_ack(self) -> None:
        """Persist the ack mark now (tests and orderly shutdown)."""
        await self._acks.persist(self._ack_mark)
