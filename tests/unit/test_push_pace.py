"""The push window's size, learnt from how long the answers take (controller.push_pace)."""

from __future__ import annotations

import pytest

from controller.push_pace import FLOOR, MIN_ROUND, SHRINK, SHRINK_FAR, TARGET_QUEUE_S, PushPace


def feed(pace: PushPace, seconds: list[float], now: float = 0.0, step: float = 0.2) -> float:
    """One answer every ``step`` seconds (each to a push sent after the one before)."""
    for value in seconds:
        now += step
        pace.answered(value, now)
    return now


def rounds(pace: PushPace, answer: float, count: int, now: float = 0.0) -> float:
    """``count`` whole rounds of answers that all took ``answer`` seconds."""
    for _ in range(count):
        now = feed(pace, [answer] * max(MIN_ROUND, pace.limit // 2), now)
    return now


def test_a_fresh_pace_starts_at_the_ceiling() -> None:
    """Nothing is known of the fleet yet: a fleet no larger than the window gets every push at
    once, a larger one has the window learnt within its first rounds."""
    assert PushPace(512).limit == 512
    assert PushPace(512, limit=3).limit == FLOOR  # within floor and ceiling
    assert PushPace(4).limit == 4 and PushPace(4).floor == 4


def test_answers_with_nothing_queued_grow_the_window_to_the_ceiling() -> None:
    pace = PushPace(512, limit=64)
    seen = [pace.limit]
    now = 0.0
    for _ in range(12):
        now = rounds(pace, 0.004, 1, now)
        seen.append(pace.limit)
    assert seen[:4] == [64, 96, 144, 216]  # by half of itself each round
    assert pace.limit == 512 and seen == sorted(seen)


def test_answers_that_queue_past_the_target_shrink_the_window_to_the_floor() -> None:
    pace = PushPace(512, base_period=1e6)
    now = feed(pace, [0.004] * MIN_ROUND)  # the base: 4 ms with nothing queued
    limits = [pace.limit]
    for _ in range(10):
        now = rounds(pace, 0.004 + 3 * TARGET_QUEUE_S, 1, now)
        limits.append(pace.limit)
    assert limits[1] == int(512 * SHRINK) and limits == sorted(limits, reverse=True)
    assert pace.limit == FLOOR  # and not below


def test_answers_queued_far_past_the_target_shrink_it_faster() -> None:
    pace = PushPace(512, base_period=1e6)
    now = feed(pace, [0.004] * MIN_ROUND)
    rounds(pace, 0.004 + 5 * TARGET_QUEUE_S, 1, now)
    assert pace.limit == int(512 * SHRINK_FAR)


def test_queueing_between_half_and_the_whole_target_keeps_the_window() -> None:
    pace = PushPace(512, base_period=1e6)
    now = feed(pace, [0.004] * MIN_ROUND)
    limit = pace.limit
    rounds(pace, 0.004 + 0.75 * TARGET_QUEUE_S, 5, now)
    assert pace.limit == limit


def test_a_few_slow_devices_do_not_shrink_everybody_s_window() -> None:
    """A third of the fleet on a satellite link (600 ms): the median answer is a fast one."""
    pace = PushPace(512)
    now = 0.0
    for _ in range(20):
        size = max(MIN_ROUND, pace.limit // 2)
        answers = [0.6 if i % 3 == 0 else 0.005 for i in range(size)]
        now = feed(pace, answers, now)
    assert pace.limit == 512


def test_a_fleet_that_is_all_slow_learns_its_base_and_is_not_held_at_the_floor() -> None:
    """Every device answers in 600 ms: after a round or two the base says so, and the window
    grows as for a fast fleet (it is the queueing that shrinks it, not a slow link)."""
    pace = PushPace(512)
    rounds(pace, 0.6, 10)
    assert pace.limit == 512


def test_answers_to_pushes_sent_before_a_decision_do_not_count_for_the_next() -> None:
    """A shrink is decided once per round trip, not again by the answers already on their way
    when it was decided (they were sent with the old window)."""
    pace = PushPace(512, base_period=1e6)
    now = feed(pace, [0.004] * MIN_ROUND)
    change = None
    while change is None:  # 200 ms answers: queued, shrink
        now += 0.25
        change = pace.answered(0.2, now)
    limit = pace.limit
    assert limit < 512
    # a burst of answers that were sent before that decision: they end no round
    assert all(pace.answered(0.5, now + 0.01 * i) is None for i in range(1, 50))
    assert pace.limit == limit


def test_the_base_forgets_what_is_older_than_two_periods() -> None:
    pace = PushPace(512, base_period=10.0)
    pace.answered(0.001, 0.0)
    assert pace.base == 0.001
    pace.answered(0.2, 11.0)  # one period on: the old minimum is still the previous bucket's
    assert pace.base == 0.001
    pace.answered(0.3, 21.5)  # two on: only the last bucket counts
    assert pace.base == pytest.approx(0.2)
    pace.answered(0.4, 60.0)  # long silence: nothing older counts
    assert pace.base == pytest.approx(0.4)


def test_a_round_is_half_a_window_of_answers_and_at_least_min_round() -> None:
    for ceiling, size in ((512, 32), (10, MIN_ROUND)):
        pace = PushPace(ceiling, limit=64)
        changes = [pace.answered(0.004, i / 1000) for i in range(size - 1)]
        assert changes == [None] * (size - 1)
        change = pace.answered(0.004, 1.0)
        assert change is not None and change.base_s == 0.004 and change.median_queue_s == 0
        assert change.limit == min(ceiling, 96)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ceiling": 0}, "ceiling must be >= 1"),
        ({"ceiling": 8, "target": 0}, "target and base period"),
        ({"ceiling": 8, "base_period": -1}, "target and base period"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PushPace(**kwargs)  # type: ignore[arg-type]
