"""Terminal flow control, both halves, without any I/O."""

from __future__ import annotations

import pytest

from margo_stream.errors import RemoteProtocolError
from margo_stream.protocol.codes import ErrorCode
from margo_stream.protocol.terminal_window import WINDOW, SendAck, TerminalWindow


def test_defaults() -> None:
    w = TerminalWindow()
    assert w.window == WINDOW == 256 * 1024 and w.ack_every == WINDOW // 4
    assert w.can_send() and w.in_flight == 0


def test_the_sender_stops_at_the_window_and_resumes_on_an_ack() -> None:
    w = TerminalWindow(window=100)
    for _ in range(3):
        assert w.can_send()
        w.on_sent(30)
    assert w.in_flight == 90 and w.can_send()
    w.on_sent(30)  # a whole chunk is admitted: 20 bytes past the window
    assert w.in_flight == 120 and not w.can_send()
    assert w.on_ack(10) is False  # 110 still out
    assert w.on_ack(30) is True  # 90 out
    assert w.acked == 30 and w.sent == 120


def test_a_chunk_larger_than_the_window_is_never_stuck() -> None:
    w = TerminalWindow(window=10, ack_every=5)
    assert w.can_send()
    w.on_sent(1000)
    assert not w.can_send()
    assert w.on_ack(1000) is True


def test_an_older_ack_is_ignored() -> None:
    w = TerminalWindow(window=100)
    w.on_sent(150)
    w.on_ack(120)
    assert w.on_ack(60) is True
    assert w.acked == 120


def test_an_ack_for_bytes_never_sent_is_the_peers_error() -> None:
    w = TerminalWindow(window=100)
    w.on_sent(10)
    with pytest.raises(RemoteProtocolError) as info:
        w.on_ack(11)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR
    assert w.acked == 0


def test_the_receiver_acks_every_quarter_window() -> None:
    w = TerminalWindow(window=100)
    assert w.ack_every == 25
    assert w.on_delivered(10) is None
    assert w.on_delivered(14) is None
    assert w.on_delivered(1) == SendAck(25)
    assert w.ack_sent == 25
    assert w.on_delivered(24) is None
    assert w.on_delivered(40) == SendAck(89)  # the running total, not the increment
    assert w.delivered == 89 and w.ack_sent == 89
    assert w.on_delivered(0) is None


def test_the_halves_are_independent() -> None:
    w = TerminalWindow(window=100)
    w.on_sent(100)
    assert not w.can_send()
    assert w.on_delivered(100) == SendAck(100)  # receiving does not open the send window
    assert not w.can_send()


def test_two_ends_in_lockstep_never_exceed_window_plus_one_chunk() -> None:
    window, chunk = 1000, 64
    sender, receiver = TerminalWindow(window), TerminalWindow(window)
    wire: list[int] = []
    peak = 0
    total = 0
    for _ in range(2000):
        if sender.can_send():
            sender.on_sent(chunk)
            wire.append(chunk)
            total += chunk
        else:  # the receiver drains one chunk and may ack
            assert wire
            ack = receiver.on_delivered(wire.pop(0))
            if ack is not None:
                sender.on_ack(ack.consumed)
        peak = max(peak, sender.in_flight)
    assert peak < window + chunk
    assert total > 10 * window  # it kept moving


@pytest.mark.parametrize(("window", "ack_every"), [(0, None), (10, 0), (10, 11)])
def test_bad_settings(window: int, ack_every: int | None) -> None:
    with pytest.raises(ValueError):
        TerminalWindow(window, ack_every)


def test_negative_counts_are_refused() -> None:
    w = TerminalWindow()
    with pytest.raises(ValueError):
        w.on_sent(-1)
    with pytest.raises(ValueError):
        w.on_delivered(-1)
