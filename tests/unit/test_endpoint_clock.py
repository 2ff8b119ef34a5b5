"""The endpoint's one clock (margo_stream.transport.endpoint_clock): deadlines that move later
cost no loop timer, an earlier one re-arms it, every deadline fires no earlier than asked and
once per turn, a connection that ended is let go, and transmits are flushed once per turn.

Driven with a fake loop: explicit time, the armed timer and the soon-callbacks in plain sight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from margo_stream.transport.endpoint_clock import COMPACT_MARGIN, EndpointClock


class FakeHandle:
    def __init__(self, when: float | None, fn: Callable[[], None]) -> None:
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[FakeHandle] = []
        self.soon: list[FakeHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, fn: Callable[[], None]) -> FakeHandle:
        handle = FakeHandle(when, fn)
        self.timers.append(handle)
        return handle

    def call_soon(self, fn: Callable[[], None]) -> FakeHandle:
        handle = FakeHandle(None, fn)
        self.soon.append(handle)
        return handle

    def armed(self) -> list[float]:
        return [h.when for h in self.timers if not h.cancelled]  # type: ignore[misc]

    def advance(self, to: float) -> None:
        """Run the armed timers due by ``to`` in order (as the loop would)."""
        while True:
            due = [h for h in self.timers if not h.cancelled and h.when <= to]  # type: ignore[operator]
            if not due:
                break
            handle = min(due, key=lambda h: h.when)  # type: ignore[arg-type, return-value]
            self.now = max(self.now, handle.when)  # type: ignore[arg-type]
            handle.cancelled = True
            handle.fn()
        self.now = to

    def run_soon(self) -> None:
        soon, self.soon = self.soon, []
        for handle in soon:
            if not handle.cancelled:
                handle.fn()


@dataclass(eq=False)
class FakeConn:
    """A connection whose aioquic wants its timer at ``wants`` (None: no timer)."""

    clock: EndpointClock
    wants: float | None = None
    clock_seq: int | None = None
    clock_at: float | None = None
    timer_at: float | None = None
    transmit_queued: bool = False
    fired: list[float] = field(default_factory=list)
    transmits: int = 0
    after_fire: float | None = None  # what it wants once its timer fired

    def fire_timer(self, now: float) -> None:
        self.fired.append(now)
        self.wants = self.after_fire
        self.transmit()

    def transmit(self) -> None:
        self.transmit_queued = False
        self.transmits += 1
        self.clock.schedule(self, self.wants)


def _clock() -> tuple[FakeLoop, EndpointClock]:
    loop = FakeLoop()
    return loop, EndpointClock(loop)  # type: ignore[arg-type]


def test_a_deadline_that_moves_later_costs_no_loop_timer():
    loop, clock = _clock()
    conn = FakeConn(clock, wants=160.0)
    conn.transmit()
    assert loop.armed() == [160.0]
    for t in (110.0, 120.0, 130.0):  # a packet each time pushes the idle deadline out
        conn.wants = t + 60.0
        conn.transmit()
    assert loop.armed() == [160.0] and len(loop.timers) == 1
    loop.advance(160.0)  # the live entry comes due: looked at, pushed again at 190
    assert conn.fired == [] and loop.armed() == [190.0]
    loop.advance(190.0)
    assert conn.fired == [190.0]


def test_an_earlier_deadline_rearms_and_nothing_fires_early():
    loop, clock = _clock()
    idle = FakeConn(clock, wants=160.0)
    idle.transmit()
    lossy = FakeConn(clock, wants=170.0, after_fire=None)
    lossy.transmit()
    lossy.wants = 100.3  # a send: loss detection soon
    lossy.transmit()
    assert loop.armed() == [100.3]
    loop.now = 100.2995  # the loop wakes half a millisecond early: fired at the deadline
    loop.timers[-1].cancelled = True
    loop.timers[-1].fn()
    assert lossy.fired == [100.3]
    assert loop.armed() == [160.0]  # its stale 170 entry is not armed, the idle one is
    loop.advance(200.0)
    assert lossy.fired == [100.3] and idle.fired == [160.0]


def test_each_connection_fires_once_per_turn_even_if_it_asks_again_at_once():
    loop, clock = _clock()
    conn = FakeConn(clock, wants=101.0)
    conn.after_fire = 101.0  # asks for the same deadline again (never progresses)
    conn.transmit()
    loop.timers[-1].cancelled = True
    clock._fire()  # type: ignore[attr-defined]  # one turn, time not yet at the deadline
    assert conn.fired == []
    loop.now = 101.0
    clock._fire()  # type: ignore[attr-defined]
    assert conn.fired == [101.0]  # once, the re-request waits for the next turn
    assert loop.armed()[-1] == 101.0


def test_an_ended_connection_is_let_go_and_never_fires():
    loop, clock = _clock()
    conns = [FakeConn(clock, wants=160.0 + i) for i in range(3 * COMPACT_MARGIN)]
    for conn in conns:
        conn.transmit()
    for conn in conns[1:]:
        clock.discard(conn)
    assert clock.pending == 1
    assert len(clock._heap) <= 2 * clock.pending + COMPACT_MARGIN  # type: ignore[attr-defined]
    loop.advance(1000.0)
    assert conns[0].fired == [160.0]
    assert all(c.fired == [] for c in conns[1:])


def test_transmits_are_flushed_once_per_turn():
    loop, clock = _clock()
    a, b = FakeConn(clock), FakeConn(clock)
    for _ in range(3):
        clock.queue_transmit(a)
    clock.queue_transmit(b)
    b.transmit()  # a direct transmit does the queued work: the flush skips it
    assert len(loop.soon) == 1
    loop.run_soon()
    assert (a.transmits, b.transmits) == (1, 1)
    clock.queue_transmit(a)
    loop.run_soon()
    assert a.transmits == 2


def test_a_failing_timer_does_not_stop_the_others(caplog: Any):
    loop, clock = _clock()
    bad, good = FakeConn(clock, wants=101.0), FakeConn(clock, wants=101.0)

    def boom(now: float) -> None:
        raise RuntimeError("boom")

    bad.fire_timer = boom  # type: ignore[method-assign]
    bad.transmit()
    good.transmit()
    loop.advance(101.0)
    assert good.fired == [101.0]
    assert "timer failed" in caplog.text


def test_an_idle_endpoint_does_not_wake_for_deadlines_keepalives_pushed_out():
    loop, clock = _clock()
    conns = [FakeConn(clock, wants=160.0 + i * 0.01) for i in range(200)]
    for conn in conns:
        conn.transmit()
    wakes = 0
    for step in range(1, 601):  # ten minutes; every connection hears a packet every 20 s
        now = 100.0 + step
        for i, conn in enumerate(conns):
            if (step + i) % 20 == 0:
                conn.wants = now + 60.0
                conn.transmit()
        before = sum(1 for h in loop.timers if h.cancelled)
        loop.advance(now)
        wakes += sum(1 for h in loop.timers if h.cancelled) - before
    assert all(c.fired == [] for c in conns)  # nobody's idle timeout came
    assert wakes <= 600 / 40 + 5  # about one per idle-timeout period, not one per connection
