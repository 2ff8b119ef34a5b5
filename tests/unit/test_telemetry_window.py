"""The agent's telemetry send window (sans-IO): in-flight bound, acks in and out of order,
regressing and hostile acks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from margo_stream.errors import LocalProtocolError
from margo_stream.protocol.telemetry_window import (
    AckAdvanced,
    AckIgnored,
    IgnoredBecause,
    ReplayWindow,
    resume_mark,
)


def test_starts_after_the_acked_mark() -> None:
    w = ReplayWindow(41)
    assert (w.acked, w.sent, w.next_seq, w.in_flight, w.can_send) == (41, 41, 42, 0, True)


def test_window_bounds_unacknowledged_batches() -> None:
    w = ReplayWindow(0, max_in_flight=3)
    for first in (1, 11, 21):
        w.batch_sent(first, first + 9)
    assert not w.can_send and w.in_flight == 3 and w.next_seq == 31
    with pytest.raises(LocalProtocolError, match="window full"):
        w.batch_sent(31, 40)
    assert w.ack_received(10) == AckAdvanced(mark=10, released=1, claimed=10)
    assert w.can_send and w.in_flight == 2


def test_batches_may_skip_lost_records_but_never_overlap() -> None:
    w = ReplayWindow(5)
    w.batch_sent(9, 12)  # 6..8 were dropped on the device
    with pytest.raises(LocalProtocolError, match="overlaps"):
        w.batch_sent(12, 14)
    with pytest.raises(LocalProtocolError, match="overlaps"):
        w.batch_sent(20, 19)
    with pytest.raises(LocalProtocolError, match="overlaps"):
        ReplayWindow(5).batch_sent(5, 6)


def test_partial_ack_keeps_the_batch_in_flight() -> None:
    w = ReplayWindow(0)
    w.batch_sent(1, 10)
    w.batch_sent(11, 20)
    assert w.ack_received(15) == AckAdvanced(mark=15, released=1, claimed=15)
    assert w.in_flight == 1 and w.acked == 15
    assert w.ack_received(20) == AckAdvanced(mark=20, released=1, claimed=20)
    assert w.in_flight == 0 and w.next_seq == 21


def test_one_ack_releases_several_batches() -> None:
    w = ReplayWindow(0)
    for first in range(1, 50, 10):
        w.batch_sent(first, first + 9)
    assert w.ack_received(30) == AckAdvanced(mark=30, released=3, claimed=30)
    assert w.in_flight == 2


def test_stale_repeated_and_regressing_acks_move_nothing() -> None:
    w = ReplayWindow(0)
    w.batch_sent(1, 10)
    w.batch_sent(11, 20)
    w.ack_received(20)
    for seq in (20, 5, 0):
        assert w.ack_received(seq) == AckIgnored(claimed=seq, mark=20, reason=IgnoredBecause.STALE)
    assert w.acked == 20 and w.next_seq == 21


def test_out_of_order_acks() -> None:
    w = ReplayWindow(0)
    for first in (1, 11, 21):
        w.batch_sent(first, first + 9)
    assert isinstance(w.ack_received(30), AckAdvanced)
    assert w.in_flight == 0
    assert w.ack_received(10).reason is IgnoredBecause.STALE  # type: ignore[union-attr]


def test_ack_beyond_what_was_sent_is_clamped() -> None:
    w = ReplayWindow(100)
    assert w.ack_received(10**12) == AckIgnored(
        claimed=10**12, mark=100, reason=IgnoredBecause.NOTHING_SENT
    )
    w.batch_sent(101, 110)
    event = w.ack_received(2**64 - 1)
    assert event == AckAdvanced(mark=110, released=1, claimed=2**64 - 1)
    assert isinstance(event, AckAdvanced) and event.clamped
    assert w.acked == 110 and w.next_seq == 111
    assert w.ack_received(111).reason is IgnoredBecause.NOTHING_SENT  # type: ignore[union-attr]


def test_resume_mark_never_passes_durable_records() -> None:
    assert resume_mark(controller_acked=50, local_acked=40, durable=60) == 50
    assert resume_mark(controller_acked=500, local_acked=40, durable=60) == 60
    assert resume_mark(controller_acked=10, local_acked=40, durable=60) == 40  # lost ack.json
    assert resume_mark(controller_acked=0, local_acked=0, durable=0) == 0


def test_invalid_windows() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(-1)
    with pytest.raises(ValueError):
        ReplayWindow(0, max_in_flight=0)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 1000),
    st.lists(
        st.one_of(
            st.tuples(st.just("send"), st.integers(0, 5), st.integers(0, 20)),
            st.tuples(st.just("ack"), st.integers(-30, 200), st.just(0)),
        ),
        max_size=60,
    ),
)
def test_property_marks_only_move_forward_within_what_was_sent(
    start: int, ops: list[tuple[str, int, int]]
) -> None:
    w = ReplayWindow(start, max_in_flight=4)
    sent: list[tuple[int, int]] = []
    for op, a, b in ops:
        if op == "send":
            if not w.can_send:
                continue
            first = w.next_seq + a
            w.batch_sent(first, first + b)
            sent.append((first, first + b))
            continue
        before = w.acked
        seq = max(0, w.sent + a - 100)
        event = w.ack_received(seq)
        assert w.acked >= before
        assert w.acked <= max([start] + [last for _, last in sent])
        if isinstance(event, AckAdvanced):
            assert event.mark == w.acked == min(seq, w.sent) > before
        else:
            assert w.acked == before
        # every batch still in flight ends above the mark
        unacked = [last for _, last in sent if last > w.acked]
        assert w.in_flight == len(unacked) <= 4
