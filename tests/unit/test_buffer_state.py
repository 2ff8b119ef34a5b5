"""Property test: the telemetry buffer against a model, through appends, acks, restarts,
torn tails and corrupted bytes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from agent.telemetry.buffer import (
    BufferConfig,
    BufferFull,
    FullPolicy,
    RecordTooLarge,
    TelemetryBuffer,
)
from agent.telemetry.segments import REC_HDR_SIZE, SEG_HDR_SIZE, encode_record
from agent.telemetry.streams import stream_of

LIMIT = 120
payloads = st.binary(min_size=0, max_size=LIMIT)


class BufferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tbuf-"))
        self._portal_cm = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.model: dict[int, bytes] = {}  # durable, unacknowledged, not dropped, not damaged
        self.damaged: dict[int, Path] = {}  # seq -> segment file holding the damaged bytes
        self.max_handed = 0
        self.acked = 0
        self.dropped_seen = 0
        self.buf: TelemetryBuffer | None = None

    @initialize(policy=st.sampled_from(list(FullPolicy)))
    def start(self, policy: FullPolicy) -> None:
        self.config = BufferConfig(
            max_bytes=2048,
            segment_bytes=400,
            max_record_bytes=LIMIT,
            policy=policy,
            commit_window_s=0.0,
        )
        self._open()

    def _open(self) -> None:
        self._cm = self.portal.wrap_async_context_manager(
            TelemetryBuffer.open(self.dir, self.config)
        )
        self.buf = self._cm.__enter__()
        self.dropped_seen = 0

    def _close(self) -> None:
        self._cm.__exit__(None, None, None)

    def teardown(self) -> None:
        try:
            if self.buf is not None:
                self._close()
        finally:
            self._portal_cm.__exit__(None, None, None)
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def _sync_after_write(self, new: dict[int, bytes]) -> None:
        """Account for records the drop-oldest policy removed."""
        self.model.update(new)
        got = {r.seq for r in self.buf.read(0, 10**6, 1 << 30)}
        missing = [s for s in self.model if s not in got]
        delta = self.buf.dropped_records - self.dropped_seen
        self.dropped_seen = self.buf.dropped_records
        if self.config.policy is FullPolicy.REJECT:
            assert not missing and delta == 0
        else:
            assert len(missing) == delta
            if got:
                assert all(s < min(got) for s in missing), "only the oldest records are dropped"
        for s in missing:
            del self.model[s]

    def _frames(self) -> list[tuple[object, int, int, int]]:
        """(segment, seq, offset, frame length) of every indexed record."""
        out = []
        for seg in self.buf._segments:
            for i, seq in enumerate(seg.seqs):
                out.append((seg, seq, seg.offsets[i], REC_HDR_SIZE + seg.lengths[i]))
        return out

    # ------------------------------------------------------------------ rules

    @rule(payload=payloads)
    def append(self, payload: bytes) -> None:
        try:
            seq = self.portal.call(self.buf.append, payload)
        except BufferFull:
            assert self.config.policy is FullPolicy.REJECT
            st_ = self.buf.stats()
            frame = len(encode_record(0, payload, stream_of(payload)))
            assert st_.bytes_used + frame + 2 * SEG_HDR_SIZE > st_.max_bytes
            return
        assert seq > self.max_handed
        self.max_handed = seq
        self._sync_after_write({seq: payload})

    @rule(batch=st.lists(payloads, min_size=1, max_size=6))
    def append_many(self, batch: list[bytes]) -> None:
        try:
            seqs = self.portal.call(self.buf.append_many, batch)
        except BufferFull:
            assert self.config.policy is FullPolicy.REJECT
            return
        assert seqs == list(range(seqs[0], seqs[0] + len(batch)))
        assert seqs[0] > self.max_handed
        self.max_handed = seqs[-1]
        self._sync_after_write(dict(zip(seqs, batch, strict=True)))

    @rule(extra=st.integers(1, 50))
    def append_too_large(self, extra: int) -> None:
        with pytest.raises(RecordTooLarge):
            self.portal.call(self.buf.append, b"x" * (LIMIT + extra))

    @rule(frac=st.floats(0, 1))
    def ack(self, frac: float) -> None:
        seq = self.acked + int((self.max_handed - self.acked) * frac)
        self.portal.call(self.buf.ack, seq)
        self.acked = max(self.acked, seq)
        for s in [s for s in self.model if s <= seq]:
            del self.model[s]

    @rule()
    def reopen(self) -> None:
        expected_corrupt = self._expected_corrupt()
        self._close()
        self._open()
        st_ = self.buf.stats()
        assert st_.corrupt_records == expected_corrupt
        assert st_.acked_seq == self.acked

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def corrupt_byte(self, data: st.DataObject) -> None:
        frames = [f for f in self._frames() if f[1] in self.model]
        seg, seq, off, length = data.draw(st.sampled_from(frames))
        pos = off + data.draw(st.integers(0, length - 1))
        (old,) = os.pread(seg.fd, 1, pos)
        os.pwrite(seg.fd, bytes([old ^ data.draw(st.integers(1, 255))]), pos)
        del self.model[seq]
        self.damaged[seq] = seg.path

    @rule(cut=st.integers(1, REC_HDR_SIZE + 1 + LIMIT))
    def crash_with_torn_tail(self, cut: int) -> None:
        """A crash part way through writing a record that was never acknowledged."""
        seg = self.buf._segments[-1]
        whole = encode_record(self.buf.next_seq, b"t" * LIMIT)
        frame = whole[: min(cut, len(whole) - 1)]
        os.pwrite(seg.fd, frame, seg.size)
        self.reopen()
        assert self.buf.stats().trimmed_bytes >= len(frame)  # plus any damaged tail records

    @precondition(lambda self: self.buf is not None and self.buf._segments[-1].count > 0)
    @rule(data=st.data())
    def truncate_tail(self, data: st.DataObject) -> None:
        """Lose the end of the newest record (as if the disk dropped it): it goes, nothing else."""
        seg = self.buf._segments[-1]
        last = seg.seqs[-1]
        frame_len = REC_HDR_SIZE + seg.lengths[-1]
        cut = data.draw(st.integers(1, frame_len - 1))
        os.ftruncate(seg.fd, seg.size - cut)
        self.model.pop(last, None)
        self.damaged.pop(last, None)  # gone entirely: trimmed, not counted as corrupt
        expected_corrupt = self._expected_corrupt(extra_tail={last})
        self._close()
        self._open()
        assert self.buf.stats().corrupt_records == expected_corrupt
        assert self.buf.stats().trimmed_bytes >= frame_len - cut

    def _expected_corrupt(self, *, extra_tail: set[int] | None = None) -> int:
        """Damaged records a reopen must count: retained, unacknowledged, not in the torn
        tail of the newest segment (a damaged run at its very end is trimmed instead)."""
        tail: set[int] = set(extra_tail or ())
        active = self.buf._segments[-1]
        for seq in reversed(active.seqs):
            if seq in self.damaged or seq in tail:
                tail.add(seq)
            else:
                break
        for seq in tail:
            self.damaged.pop(seq, None)  # trimmed with the tail by the coming reopen
        retained = {seg.path for seg in self.buf._segments}
        return sum(
            1
            for d, path in self.damaged.items()
            if path in retained and d > self.acked and d not in tail
        )

    # ------------------------------------------------------------------ invariants

    @invariant()
    def matches_model(self) -> None:
        if self.buf is None:
            return
        got = self.buf.read(0, 10**6, 1 << 30)
        seqs = [r.seq for r in got]
        assert seqs == sorted(set(seqs))
        assert {r.seq: r.payload for r in got} == self.model
        st_ = self.buf.stats()
        assert st_.bytes_used <= st_.max_bytes
        assert st_.next_seq > self.max_handed
        assert st_.records_retained == len(self.model)
        assert st_.first_seq == (min(self.model) if self.model else st_.next_seq)


BufferMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBufferStateMachine = BufferMachine.TestCase
