"""Group commit for the telemetry buffer: many appends, one fsync round.

Appends write straight into the page cache and mark the touched segments dirty here. A
committer task (``TelemetryBuffer._committer``) calls ``gather`` to wait a short window
(``window_s`` from the round's first write, or until ``max_records`` are pending), then
``sync_round`` to take a snapshot of everything written so far, fsync the touched segment files
(and the directory, if a segment was created or deleted) in a worker thread, and hand back the
round so the buffer can wake every appender that wrote before the snapshot.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from agent.telemetry.segments import Segment
from margo_stream.errors import TelemetryBufferError
from margo_stream.fsutil import fsync_dir


class Round:
    """One group commit: every appender that wrote before its snapshot waits on it."""

    __slots__ = ("event", "error")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.error: TelemetryBufferError | None = None


class PendingAppend:
    """Records written (not yet durable) by ``TelemetryBuffer.submit``."""

    __slots__ = ("seqs", "_round")

    def __init__(self, seqs: range, round_: Round) -> None:
        self.seqs = seqs
        self._round = round_

    async def wait(self) -> range:
        """Wait until the records are durable; raises ``BufferIOError`` if the fsync failed."""
        await self._round.event.wait()
        if self._round.error is not None:
            raise self._round.error
        return self.seqs


def fsync_all(fds: list[int], directory: Path | None) -> None:
    for fd in fds:
        os.fsync(fd)
    if directory is not None:
        fsync_dir(directory)


class GroupCommit:
    """What awaits the next fsync round: dirty segments, the directory, pending appenders."""

    def __init__(self, directory: Path, window_s: float, max_records: int) -> None:
        self.directory = directory
        self.window_s = window_s
        self.max_records = max_records
        self.dirty: dict[Segment, None] = {}
        self.dir_dirty = False
        self.syncing: list[Segment] = []
        self.pending_records = 0
        self.round_started = 0.0
        self.round = Round()
        self.closing = False
        self._wake = anyio.Event()
        self._batch_full = anyio.Event()

    def in_flight(self, seg: Segment) -> bool:
        """``seg`` waits for, or is in, an fsync (so its file descriptor must stay open)."""
        return seg in self.dirty or seg in self.syncing

    @property
    def idle(self) -> bool:
        return not self.dirty and self.pending_records == 0

    def written(self, seqs: range) -> PendingAppend:
        """Records ``seqs`` were written: join them to the current round."""
        if self.pending_records == 0:
            self.round_started = time.monotonic()
        self.pending_records += len(seqs)
        if not self._wake.is_set():
            self._wake.set()
        if self.pending_records >= self.max_records:
            self._batch_full.set()
        return PendingAppend(seqs, self.round)

    def close(self) -> None:
        """Let the committer finish: commit what is pending without waiting for the window."""
        self.closing = True
        self._wake.set()

    async def gather(self) -> None:
        """Wait for a write, then for the rest of the round's window (or a full batch)."""
        await self._wake.wait()
        # The window runs from the round's first write, so writes made while the previous
        # fsync ran have already used part of it.
        remaining = self.window_s - (time.monotonic() - self.round_started)
        if remaining > 0 and self.pending_records < self.max_records and not self.closing:
            with anyio.move_on_after(remaining):
                await self._batch_full.wait()
        self._wake = anyio.Event()
        self._batch_full = anyio.Event()

    async def sync_round(
        self, *, skip: bool, close_fd: Callable[[Segment], None]
    ) -> tuple[Round, OSError | None]:
        """Fsync everything written so far (unless ``skip``); the round and the fsync's error.

        Segments deleted meanwhile are closed with ``close_fd`` once their fsync is over.
        """
        rnd, self.round = self.round, Round()
        segs = list(self.dirty)
        sizes = [s.size for s in segs]
        self.dirty.clear()
        self.pending_records = 0
        directory = self.directory if self.dir_dirty else None
        self.dir_dirty = False
        self.syncing = segs
        error: OSError | None = None
        try:
            if not skip and (segs or directory is not None):
                await anyio.to_thread.run_sync(fsync_all, [s.fd for s in segs], directory)
        except OSError as exc:
            error = exc
        finally:
            self.syncing = []
            for seg in segs:
                # a segment written to again while this round ran is back in ``dirty``: its
                # descriptor stays open for the next round even if it was deleted meanwhile
                if seg.retired and seg not in self.dirty:
                    close_fd(seg)
        if not skip and error is None:
            for seg, size in zip(segs, sizes, strict=True):
                seg.durable_size = max(seg.durable_size, size)
        return rnd, error
