"""The controller's telemetry ingest (sans-IO): gaps, duplicates, the ack, state errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from margo_stream.errors import LocalProtocolError, RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.telemetry_codec import encode_batch
from margo_stream.protocol.telemetry_ingest import (
    IngestSession,
    IngestState,
    RecordGap,
    SendAck,
    StoreRecords,
)


def batch(seqs: list[int], oldest: int | None = None) -> m.Telemetry:
    records = [(s, "m", b"%d" % s) for s in seqs]
    return encode_batch(records, oldest=seqs[0] if oldest is None else oldest)


def test_fresh_batch_is_stored_then_acked() -> None:
    s = IngestSession(0)
    step = s.receive_batch(batch([1, 2, 3]))
    assert step == StoreRecords(((1, "m", b"1"), (2, "m", b"2"), (3, "m", b"3")))
    assert s.state is IngestState.AWAIT_STORE
    assert s.records_stored(3) == SendAck(seq=3, records=3, duplicates=0)
    assert s.state is IngestState.READY and s.watermark == 3


def test_resent_batch_is_all_duplicates_and_acked_at_once() -> None:
    s = IngestSession(10)
    assert s.receive_batch(batch([4, 5, 6], oldest=1)) == SendAck(10, 0, 3)
    assert s.state is IngestState.READY


def test_overlapping_batch_stores_only_fresh_records() -> None:
    s = IngestSession(5)
    step = s.receive_batch(batch([4, 5, 6, 7], oldest=1))
    assert isinstance(step, StoreRecords) and [r[0] for r in step.records] == [6, 7]
    assert s.records_stored(7) == SendAck(7, 2, 2)


def test_gap_below_oldest_is_recorded_before_storing() -> None:
    s = IngestSession(10)
    assert s.receive_batch(batch([20, 21], oldest=18)) == RecordGap(11, 17)
    assert s.state is IngestState.AWAIT_GAP
    step = s.gap_recorded(17)
    assert isinstance(step, StoreRecords) and [r[0] for r in step.records] == [20, 21]
    # 18..19 were neither sent nor dropped yet: the store's watermark stays at 17
    assert s.records_stored(17) == SendAck(17, 2, 0)


def test_gap_whose_watermark_jumps_past_the_batch() -> None:
    # the store already held 18..30 (stored by an earlier connection): nothing is fresh
    s = IngestSession(10)
    assert s.receive_batch(batch([20, 21], oldest=18)) == RecordGap(11, 17)
    assert s.gap_recorded(30) == SendAck(30, 0, 2)


def test_no_gap_when_oldest_follows_the_watermark() -> None:
    s = IngestSession(10)
    assert isinstance(s.receive_batch(batch([11, 12], oldest=11)), StoreRecords)
    s = IngestSession(10)
    assert isinstance(s.receive_batch(batch([13], oldest=5)), StoreRecords)


def test_watermark_never_moves_backwards() -> None:
    s = IngestSession(10)
    s.receive_batch(batch([11]))
    assert s.records_stored(3) == SendAck(10, 1, 0)
    assert s.watermark == 10


def test_calls_out_of_order_are_our_bug() -> None:
    s = IngestSession(0)
    with pytest.raises(LocalProtocolError, match="records_stored is not allowed in state ready"):
        s.records_stored(1)
    with pytest.raises(LocalProtocolError, match="gap_recorded"):
        s.gap_recorded(1)
    s.receive_batch(batch([1]))
    with pytest.raises(LocalProtocolError, match="receive_batch is not allowed"):
        s.receive_batch(batch([2]))  # the ack of the first batch must come first


def test_bad_batch_breaks_the_session_for_good() -> None:
    s = IngestSession(0)
    bad = batch([1, 2]).model_copy(update={"data": b"junk"})
    with pytest.raises(RemoteProtocolError, match="zlib"):
        s.receive_batch(bad)
    assert s.state is IngestState.BROKEN
    with pytest.raises(LocalProtocolError):
        s.receive_batch(batch([1, 2]))


def test_invalid_start() -> None:
    with pytest.raises(ValueError):
        IngestSession(-1)


class FakeStore:
    """A store with the real watermark rule, to drive the machine end to end."""

    def __init__(self) -> None:
        self.have: set[int] = set()
        self.watermark = 0

    def _advance(self) -> int:
        while self.watermark + 1 in self.have:
            self.watermark += 1
        return self.watermark

    def gap(self, first: int, last: int) -> int:
        self.have.update(range(first, last + 1))
        return self._advance()

    def ingest(self, seqs: list[int]) -> int:
        assert not self.have.intersection(seqs), "stored twice"
        self.have.update(seqs)
        return self._advance()


def drive(s: IngestSession, store: FakeStore, b: m.Telemetry) -> SendAck:
    step = s.receive_batch(b)
    while not isinstance(step, SendAck):
        if isinstance(step, RecordGap):
            step = s.gap_recorded(store.gap(step.first, step.last))
        else:
            step = s.records_stored(store.ingest([r[0] for r in step.records]))
    return step


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(1, 6), st.booleans()), max_size=30))
def test_property_acks_are_monotonic_and_cover_only_stored_or_lost(
    plan: list[tuple[int, int, bool]],
) -> None:
    """A device that drops records and resends batches (lost acks): nothing is stored twice,
    the ack never regresses, and everything at or below it is stored or recorded lost."""
    store = FakeStore()
    s = IngestSession(0)
    next_seq, acked = 1, 0
    for drop, size, resend in plan:
        oldest = max(next_seq - 3, 1) if resend else next_seq + drop
        first = oldest if resend else next_seq + drop
        seqs = list(range(first, first + size))
        ack = drive(s, store, batch(seqs, oldest=oldest))
        assert ack.seq >= acked
        assert all(q in store.have for q in range(1, ack.seq + 1))
        acked = ack.seq
        next_seq = max(next_seq, seqs[-1] + 1)
