"""The status hold's rules (controller.status_hold), on a backlog and a clock the test moves:
statuses wait only while a fan-out is under way, keep their order, go once the pushes are out
or the first has waited its longest, and never pile up past the bound."""

from __future__ import annotations

import pytest

from controller.push_window import PushWindow
from controller.status_hold import StatusHold


class Backlog:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


def test_nothing_is_held_without_a_fan_out() -> None:
    backlog = Backlog(63)
    hold = StatusHold[str](backlog, at=64)
    assert not hold.hold("a", now=0.0)  # 63 pushes outstanding: stored at once
    assert hold.held == 0 and not hold.due(0.0)


def test_held_in_order_until_the_pushes_are_out() -> None:
    backlog = Backlog(500)
    hold = StatusHold[str](backlog, at=64, longest=2.0)
    assert hold.hold("a", now=10.0) and hold.held == 1  # the first: the caller starts a release
    backlog.value = 10
    # a status of a device already held joins the hold even with the fan-out nearly done, so
    # that it is not stored ahead of the older one
    assert hold.hold("b", now=10.1) and hold.held == 2
    assert hold.due(10.1)  # fewer than 64 outstanding: go
    assert hold.take() == ["a", "b"]
    assert hold.held == 0 and not hold.due(10.2)
    assert not hold.hold("c", now=10.2)  # nothing held, no fan-out: at once again


def test_a_long_fan_out_releases_every_longest_seconds() -> None:
    backlog = Backlog(10_000)
    hold = StatusHold[int](backlog, at=64, longest=2.0)
    assert hold.hold(1, now=100.0)
    assert hold.hold(2, now=101.5)
    assert not hold.due(101.99)
    assert hold.due(102.0)  # the first waited 2 s, though the fan-out goes on
    assert hold.take() == [1, 2]
    assert hold.hold(3, now=102.01)  # a new hold starts its own two seconds
    assert not hold.due(103.9) and hold.due(104.01)


def test_the_hold_is_bounded() -> None:
    hold = StatusHold[int](Backlog(1000), at=1, most=3)
    assert [hold.hold(k, now=0.0) for k in range(5)] == [True, True, True, False, False]
    assert hold.held == 3


def test_bad_settings_are_refused() -> None:
    for kwargs in ({"at": 0}, {"longest": 0.0}, {"most": 0}):
        with pytest.raises(ValueError, match="status hold"):
            StatusHold[int](Backlog(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_push_windows_backlog_counts_pushes_in_flight_and_queued(
    anyio_backend: str,
) -> None:
    window = PushWindow(2)
    assert window.backlog() == 0
    async with window.slot(), window.slot():
        assert window.backlog() == 2
    assert window.backlog() == 0
