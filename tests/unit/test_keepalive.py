"""The agent's keepalive core, driven with explicit ``now`` values."""

from __future__ import annotations

import math

import pytest

from margo_stream.protocol.keepalive import (
    DEAD_AFTER_MISSES,
    PROBE_S,
    Keepalive,
    LinkDead,
    Phase,
    SendPing,
)

NEVER = -math.inf  # ``last_received`` before any packet arrived


def test_nothing_happens_before_the_first_interval() -> None:
    k = Keepalive(10.0, now=100.0)
    assert k.deadline == 110.0 and k.phase is Phase.WAITING
    assert k.timer(100.0, NEVER) is None
    assert k.timer(109.999, NEVER) is None
    assert k.phase is Phase.WAITING and k.deadline == 110.0


def test_probe_is_at_most_half_the_interval() -> None:
    assert Keepalive(10.0, now=0.0).probe == PROBE_S
    assert Keepalive(1.0, now=0.0).probe == 0.5
    assert Keepalive(1.0, now=0.0, probe=0.1).probe == 0.1


def test_an_answered_ping_waits_a_whole_interval_again() -> None:
    k = Keepalive(10.0, now=0.0)
    assert k.timer(10.0, NEVER) == SendPing()
    assert k.phase is Phase.PROBING and k.deadline == 12.0
    assert k.timer(11.0, 10.5) is None  # early: not yet judged
    assert k.timer(12.0, 10.5) is None
    assert k.phase is Phase.WAITING and k.deadline == 22.0 and k.misses == 0
    assert k.timer(22.0, 10.5) == SendPing()


def test_a_packet_at_the_very_instant_of_the_ping_counts_as_an_answer() -> None:
    k = Keepalive(4.0, now=0.0)
    assert k.timer(4.0, NEVER) == SendPing()
    assert k.timer(6.0, 4.0) is None
    assert k.misses == 0 and k.phase is Phase.WAITING


def test_a_packet_before_the_ping_is_no_answer() -> None:
    k = Keepalive(10.0, now=0.0)
    assert k.timer(10.0, 0.0) == SendPing()
    assert k.timer(12.0, 9.999) == SendPing()  # missed: probed again at once
    assert k.misses == 1 and k.phase is Phase.PROBING and k.deadline == 14.0


def test_three_misses_in_a_row_declare_the_link_dead_within_seconds() -> None:
    k = Keepalive(10.0, now=0.0)
    last = 0.0  # the last packet: an interval before the first ping
    timeline = [
        (10.0, SendPing()),  # ping 1
        (12.0, SendPing()),  # miss 1: ping 2 at once (not an interval later)
        (14.0, SendPing()),  # miss 2: ping 3
    ]
    for now, expected in timeline:
        assert k.deadline == now
        assert k.timer(now, last) == expected
    assert k.misses == 2
    # dead 3 probes (6 s) after the first unanswered ping
    assert k.timer(16.0, last) == LinkDead(silent_s=16.0, misses=DEAD_AFTER_MISSES)
    assert k.phase is Phase.DEAD and k.deadline == math.inf
    assert k.timer(1000.0, last) is None  # final


def test_an_answer_after_a_miss_resets_the_count() -> None:
    k = Keepalive(10.0, now=0.0)
    k.timer(10.0, NEVER)
    assert k.timer(12.0, NEVER) == SendPing()  # miss 1, ping 2
    assert k.timer(14.0, 12.2) is None
    assert k.misses == 0 and k.phase is Phase.WAITING and k.deadline == 24.0
    # a later single miss does not add to the old one
    k.timer(24.0, 12.2)
    k.timer(26.0, 12.2)
    assert k.misses == 1


def test_a_packet_within_the_interval_moves_the_ping_to_an_interval_after_it() -> None:
    """A busy link carries no pings: traffic proves it alive as well as an answer would."""
    k = Keepalive(10.0, now=0.0)
    assert k.timer(10.0, 4.0) is None  # a push arrived at 4: no ping at 10
    assert k.phase is Phase.WAITING and k.deadline == 14.0
    assert k.timer(14.0, 13.0) is None and k.deadline == 23.0  # and another at 13
    assert k.timer(23.0, 13.0) == SendPing()  # then ten seconds of silence: ping
    assert k.phase is Phase.PROBING and k.deadline == 25.0


def test_a_link_that_goes_silent_is_still_declared_dead_within_the_bound() -> None:
    """The controller's last packet at 7.3, then nothing: the first ping an interval after
    it, dead ``dead_after * probe`` later, whatever the traffic before."""
    k = Keepalive(10.0, now=0.0)
    now, action = 0.0, None
    while not isinstance(action, LinkDead):
        now = k.deadline
        action = k.timer(now, min(now, 7.3))
    assert now == pytest.approx(7.3 + 10.0 + DEAD_AFTER_MISSES * PROBE_S)
    assert action.misses == DEAD_AFTER_MISSES and action.silent_s == pytest.approx(16.0)


def test_late_timer_calls_measure_from_when_they_happen() -> None:
    k = Keepalive(10.0, now=0.0)
    assert k.timer(15.0, NEVER) == SendPing()  # the driver overslept
    assert k.deadline == 17.0


def test_dead_after_one_miss() -> None:
    k = Keepalive(1.0, now=0.0, probe=0.25, dead_after=1)
    assert k.timer(1.0, NEVER) == SendPing()
    assert k.timer(1.25, NEVER) == LinkDead(silent_s=math.inf, misses=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": 0.0},
        {"interval": -1.0},
        {"interval": 1.0, "probe": 0.0},
        {"interval": 1.0, "dead_after": 0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Keepalive(now=0.0, **kwargs)  # type: ignore[arg-type]


def test_events_are_frozen() -> None:
    event = LinkDead(1.0, 3)
    with pytest.raises(AttributeError):
        event.misses = 4  # type: ignore[misc]
