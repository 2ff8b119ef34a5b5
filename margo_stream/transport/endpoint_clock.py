"""One clock for every connection of an endpoint: their QUIC deadlines in one heap behind one
event-loop timer, and their transmits in one flush per loop turn.

Theory of operation. aioquic tells a connection, after each transmit, when it next needs its
timer (``get_timer()``): the idle timeout, loss detection, an ACK delay, pacing. A connection
with an event-loop timer of its own cancels and re-arms it on almost every packet, since a
packet received pushes the idle deadline out: on the controller, thousands of loop timer
handles made and cancelled per second for deadlines that almost never fire. Here a connection
only *reports* its deadline (``schedule``):

- an entry in the heap is (deadline, sequence, connection); a connection has at most one live
  entry (its ``clock_seq`` names it), and older ones are stale and skipped when they come up;
- a deadline that moves *later* (the common case: the idle timeout after a packet) costs
  nothing: the live entry stays, and when it comes due the connection's current deadline is
  looked up and the entry pushed again at it (lazily, once per idle-timeout period at most);
- a deadline that moves *earlier* (loss detection after a send) pushes a new entry that
  becomes the live one, and re-arms the loop timer only if it is the heap's earliest;
- an entry due within ``GRANULARITY`` is fired with ``now`` = its deadline, as aioquic's own
  asyncio adapter does, so a loop timer that wakes a fraction of a millisecond early does not
  spin; nothing fires before it is due otherwise, so no guarantee depends on this clock being
  coarser than a per-connection timer (loss recovery, idle timeouts, keepalive replies keep
  their timing to the loop's resolution);
- before the loop timer is armed, the entries at the top of the heap are looked at: stale ones
  are dropped and those whose deadline moved later pushed again at it, so the timer is armed
  for a deadline some connection still wants (an idle endpoint, whose every deadline each
  keepalive pushes out, wakes about once per idle-timeout period, not once per connection);
- stale entries are dropped when the heap holds more than twice the live ones (plus a margin),
  so a connection that ended is let go within one such compaction, not kept until its old
  deadline.

Transmits: ``queue_transmit`` puts a connection on the list flushed at the end of the loop turn
(one ``call_soon`` for the whole endpoint, not one per connection); each connection sends once
per turn however many events asked it to.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from typing import Protocol

log = logging.getLogger("margo.transport")

GRANULARITY = 0.001  # seconds: the event loop's timer resolution
COMPACT_MARGIN = 64  # stale entries tolerated beyond twice the live ones
REVALIDATE = 512  # entries looked at, at most, before the loop timer is armed


class Clocked(Protocol):
    """What the clock needs of a connection (``Connection`` in ``connection.py``)."""

    clock_seq: int | None  # the sequence number of the connection's live heap entry
    clock_at: float | None  # the deadline of that entry
    timer_at: float | None  # the deadline the connection wants now (aioquic's get_timer())
    transmit_queued: bool

    def fire_timer(self, now: float) -> None: ...

    def transmit(self) -> None: ...


class EndpointClock:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, Clocked]] = []
        self._seq = itertools.count()
        self._live = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._queued: list[Clocked] = []
        self._flush_handle: asyncio.Handle | None = None
        self._firing = False

    # --- deadlines -----------------------------------------------------------------------------
    def schedule(self, conn: Clocked, at: float | None) -> None:
        """``conn`` wants its timer at ``at`` (None: not at all)."""
        conn.timer_at = at
        if at is None or (conn.clock_at is not None and conn.clock_at <= at):
            return  # no timer, or the live entry comes first and will look again
        if conn.clock_seq is None:
            self._live += 1
        seq = next(self._seq)
        conn.clock_seq, conn.clock_at = seq, at
        heapq.heappush(self._heap, (at, seq, conn))
        if self._firing:
            return  # _fire arms the loop timer and compacts when it is done
        if self._timer_at is None or at < self._timer_at:
            self._arm(at)
        elif len(self._heap) > 2 * self._live + COMPACT_MARGIN:
            self._compact()

    def discard(self, conn: Clocked) -> None:
        """``conn`` needs no timer any more (it ended): its entry is stale from now on."""
        conn.timer_at = None
        if conn.clock_seq is not None:
            conn.clock_seq = conn.clock_at = None
            self._live -= 1
            if not self._firing and len(self._heap) > 2 * self._live + COMPACT_MARGIN:
                self._compact()

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._fire)

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if e[2].clock_seq == e[1]]
        heapq.heapify(self._heap)

    def _fire(self) -> None:
        """The loop timer: every entry due now, each connection's once (what they schedule
        while firing waits for the next turn, so none can spin here)."""
        self._timer = self._timer_at = None
        heap = self._heap
        horizon = self.loop.time() + GRANULARITY
        due_now: list[Clocked] = []
        while heap and heap[0][0] <= horizon:
            _, seq, conn = heapq.heappop(heap)
            if conn.clock_seq != seq:
                continue  # stale: the connection has a newer entry, or none
            conn.clock_seq = conn.clock_at = None
            self._live -= 1
            due_now.append(conn)
        self._firing = True
        try:
            for conn in due_now:
                due = conn.timer_at
                if due is None:
                    continue
                if due <= horizon:
                    try:
                        conn.fire_timer(max(self.loop.time(), due))  # transmits: schedules anew
                    except Exception:
                        log.exception(
                            "a connection's timer failed", extra={"event": "timer-failed"}
                        )
                else:
                    self.schedule(conn, due)  # the deadline moved later: look again then
        finally:
            self._firing = False
            if len(self._heap) > 2 * self._live + COMPACT_MARGIN:
                self._compact()
            self._arm_next()

    def _arm_next(self) -> None:
        """Arm the loop timer at the first deadline a connection still wants: a stale entry at
        the top of the heap is dropped and one whose deadline moved later is pushed again at it
        first (at most ``REVALIDATE`` of them per call), so an idle endpoint does not wake
        for deadlines that every keepalive pushed out; it wakes about once per idle-timeout
        period, not once per connection."""
        heap = self._heap
        for _ in range(REVALIDATE):
            if not heap:
                return
            at, seq, conn = heap[0]
            if conn.clock_seq != seq:
                heapq.heappop(heap)
                continue
            due = conn.timer_at
            if due is None:
                heapq.heappop(heap)
                conn.clock_seq = conn.clock_at = None
                self._live -= 1
                continue
            if due <= at:
                break
            seq = next(self._seq)
            conn.clock_seq, conn.clock_at = seq, due
            heapq.heapreplace(heap, (due, seq, conn))
        if heap:
            self._arm(heap[0][0])

    @property
    def pending(self) -> int:
        """Connections with a deadline in the heap."""
        return self._live

    # --- transmits -------------------------------------------------------------------------------
    def queue_transmit(self, conn: Clocked) -> None:
        """Have ``conn`` transmit at the end of this loop turn (once, however often asked)."""
        if conn.transmit_queued:
            return
        conn.transmit_queued = True
        self._queued.append(conn)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        queued, self._queued = self._queued, []
        for conn in queued:
            if conn.transmit_queued:  # not already sent by a direct transmit meanwhile
                conn.transmit()

    def close(self) -> None:
        for handle in (self._timer, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._timer_at = self._flush_handle = None
        self._heap.clear()
        self._queued.clear()
        self._live = 0
