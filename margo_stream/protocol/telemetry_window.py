"""The agent's side of a telemetry stream, sans-IO: which records to send next, how many
batches may be unacknowledged, and what an ack from the controller lets the buffer drop.

Theory of operation
-------------------
A stream starts from the buffer's acknowledged mark (``resume_mark`` first folds in the mark
the controller announced in its hello answer, never past what is durable here). The adapter
asks ``can_send``; while it is true it reads records from ``next_seq`` on, sends them as one
batch and reports ``batch_sent(first, last)``. At most ``max_in_flight`` batches are
unacknowledged at a time, so a large backlog never crowds the connection.

Each ``TelemetryAck`` goes through ``ack_received(seq)``, which answers with one event:

* ``AckAdvanced(mark, released, claimed)``: the buffer may drop every record up to ``mark``;
  ``released`` batches left the window. ``mark`` never exceeds the highest seq sent on this
  stream (or the mark the stream started from): an ack for records never sent (a confused or
  hostile controller, or a watermark moved by another connection) is clamped, so records are
  dropped only after the controller had them in hand; what was clamped is sent again and
  the controller deduplicates it. ``claimed`` is the value the controller sent.
* ``AckIgnored(claimed, mark, reason)``: nothing moved (a stale, repeated or regressing ack, or
  an ack for nothing sent).

Errors are ours alone (``LocalProtocolError``): reporting a batch while the window is full, or
one that overlaps what was already sent.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from margo_stream.errors import LocalProtocolError
from margo_stream.protocol.codes import ErrorCode

DEFAULT_MAX_IN_FLIGHT = 8


class IgnoredBecause(enum.Enum):
    STALE = "at or below the mark already acknowledged"
    NOTHING_SENT = "beyond every record sent on this stream"


@dataclass(frozen=True, slots=True)
class AckAdvanced:
    mark: int
    released: int
    claimed: int

    @property
    def clamped(self) -> bool:
        """The controller acknowledged more than this stream sent."""
        return self.claimed > self.mark


@dataclass(frozen=True, slots=True)
class AckIgnored:
    claimed: int
    mark: int
    reason: IgnoredBecause


AckEvent = AckAdvanced | AckIgnored


def resume_mark(controller_acked: int, local_acked: int, durable: int) -> int:
    """Where a new stream starts: the controller may have stored records whose ack was lost
    with the last connection, but the mark never moves past what is durable here."""
    return max(local_acked, min(controller_acked, durable))


class ReplayWindow:
    """Send window of one telemetry stream. ``acked``: the buffer's mark at stream start."""

    __slots__ = ("_acked", "_sent", "_in_flight", "max_in_flight")

    def __init__(self, acked: int, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        if acked < 0 or max_in_flight < 1:
            raise ValueError(f"invalid window: acked {acked}, max_in_flight {max_in_flight}")
        self._acked = acked
        self._sent = acked  # highest seq sent (or covered by the starting mark)
        self._in_flight: deque[int] = deque()  # last seq of each unacknowledged batch
        self.max_in_flight = max_in_flight

    @property
    def acked(self) -> int:
        return self._acked

    @property
    def sent(self) -> int:
        """Highest seq sent on this stream (the starting mark before anything was sent)."""
        return self._sent

    @property
    def next_seq(self) -> int:
        """The first seq the next batch may hold."""
        return self._sent + 1

    @property
    def in_flight(self) -> int:
        """Unacknowledged batches."""
        return len(self._in_flight)

    @property
    def can_send(self) -> bool:
        return len(self._in_flight) < self.max_in_flight

    def batch_sent(self, first: int, last: int) -> None:
        """The adapter sent records ``first..last`` (gaps allowed) as one batch."""
        if not self.can_send:
            raise LocalProtocolError(
                f"telemetry window full ({self.max_in_flight} batches unacknowledged)",
                ErrorCode.PROTOCOL_ERROR,
            )
        if first < self.next_seq or last < first:
            raise LocalProtocolError(
                f"telemetry batch {first}..{last} overlaps what was sent (next seq "
                f"{self.next_seq})",
                ErrorCode.PROTOCOL_ERROR,
            )
        self._in_flight.append(last)
        self._sent = last

    def ack_received(self, seq: int) -> AckEvent:
        """The controller stored every record up to ``seq`` durably."""
        mark = min(seq, self._sent)
        if mark <= self._acked:
            reason = IgnoredBecause.STALE if seq <= self._acked else IgnoredBecause.NOTHING_SENT
            return AckIgnored(seq, self._acked, reason)
        released = 0
        while self._in_flight and self._in_flight[0] <= mark:
            self._in_flight.popleft()
            released += 1
        self._acked = mark
        return AckAdvanced(mark, released, seq)
