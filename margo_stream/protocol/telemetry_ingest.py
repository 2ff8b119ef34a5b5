"""The controller's side of a telemetry stream, sans-IO: what to store from each batch, which
records the device lost, and what to acknowledge.

Theory of operation
-------------------
The store is the authority on the device's *watermark*: the highest seq ``w`` such that every
seq up to ``w`` is stored durably or recorded as lost. An ``IngestSession`` starts from the
watermark the store reported and takes one batch at a time, through a small table of states::

    READY       --receive_batch-->   AWAIT_GAP    (answer: RecordGap)
                                     AWAIT_STORE  (answer: StoreRecords)
                                     READY        (answer: SendAck: nothing new)
    AWAIT_GAP   --gap_recorded--->   AWAIT_STORE | READY
    AWAIT_STORE --records_stored->   READY        (answer: SendAck)

* The batch is decoded first (``telemetry_codec.decode_batch``, the trust boundary): a bad
  batch raises ``RemoteProtocolError`` and the session is broken for good (errors are sticky).
* A batch whose ``oldest`` is above ``watermark + 1`` proves the device dropped the records in
  between before they were sent: ``RecordGap(first, last)``; the store records it and reports
  the new watermark (it may move further, past records stored earlier).
* Records above the watermark are fresh: ``StoreRecords(records)``; the rest are duplicates
  (a batch resent after a lost ack), counted and never stored twice.
* ``SendAck(seq)`` comes only once the store reported every step durable, so the agent drops
  nothing the store does not hold. The watermark never moves backwards.

Calling a method in the wrong state is our bug: ``LocalProtocolError``.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

from margo_stream.errors import LocalProtocolError, RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.protocol.telemetry_codec import Triple, decode_batch


def _seq(record: Triple) -> int:
    return record[0]


class IngestState(enum.Enum):
    READY = "ready"
    AWAIT_GAP = "await-gap"
    AWAIT_STORE = "await-store"
    BROKEN = "broken"


@dataclass(frozen=True, slots=True)
class RecordGap:
    """Record that the device lost ``first..last``; then call ``gap_recorded``."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class StoreRecords:
    """Store these records durably; then call ``records_stored``."""

    records: tuple[Triple, ...]


@dataclass(frozen=True, slots=True)
class SendAck:
    """The batch is done: acknowledge ``seq``. ``records`` were fresh, ``duplicates`` not."""

    seq: int
    records: int
    duplicates: int


IngestStep = RecordGap | StoreRecords | SendAck

# (state, input) -> states the input may lead to; the answer picks one of them.
TRANSITIONS: dict[tuple[IngestState, str], frozenset[IngestState]] = {
    (IngestState.READY, "receive_batch"): frozenset(
        {IngestState.AWAIT_GAP, IngestState.AWAIT_STORE, IngestState.READY}
    ),
    (IngestState.AWAIT_GAP, "gap_recorded"): frozenset(
        {IngestState.AWAIT_STORE, IngestState.READY}
    ),
    (IngestState.AWAIT_STORE, "records_stored"): frozenset({IngestState.READY}),
}

_NEXT_STATE: dict[type[RecordGap | StoreRecords | SendAck], IngestState] = {
    RecordGap: IngestState.AWAIT_GAP,
    StoreRecords: IngestState.AWAIT_STORE,
    SendAck: IngestState.READY,
}


class IngestSession:
    """One telemetry stream of one device, from ``watermark`` (as the store reported it)."""

    __slots__ = ("_state", "_watermark", "_records", "_duplicates")

    def __init__(self, watermark: int) -> None:
        if watermark < 0:
            raise ValueError(f"invalid telemetry watermark {watermark}")
        self._state = IngestState.READY
        self._watermark = watermark
        self._records: list[Triple] = []  # the batch being ingested
        self._duplicates = 0

    @property
    def state(self) -> IngestState:
        return self._state

    @property
    def watermark(self) -> int:
        return self._watermark

    def _enter(self, name: str) -> None:
        if (self._state, name) not in TRANSITIONS:
            raise LocalProtocolError(
                f"telemetry ingest: {name} is not allowed in state {self._state.value}",
                ErrorCode.INTERNAL_ERROR,
            )

    def _answer(self, name: str, step: IngestStep) -> IngestStep:
        nxt = _NEXT_STATE[type(step)]
        assert nxt in TRANSITIONS[(self._state, name)]
        self._state = nxt
        return step

    def receive_batch(self, batch: m.Telemetry) -> IngestStep:
        """A batch arrived. Raises ``RemoteProtocolError`` for a malformed one."""
        self._enter("receive_batch")
        try:
            records = decode_batch(batch)
        except RemoteProtocolError:
            self._state = IngestState.BROKEN
            raise
        self._records = records
        if batch.oldest > self._watermark + 1:
            return self._answer("receive_batch", RecordGap(self._watermark + 1, batch.oldest - 1))
        return self._answer("receive_batch", self._fresh())

    def gap_recorded(self, watermark: int) -> IngestStep:
        """The store recorded the gap durably; ``watermark`` is what it reported."""
        self._enter("gap_recorded")
        self._advance(watermark)
        return self._answer("gap_recorded", self._fresh())

    def records_stored(self, watermark: int) -> IngestStep:
        """The store holds the fresh records durably; ``watermark`` is what it reported."""
        self._enter("records_stored")
        self._advance(watermark)
        return self._answer("records_stored", self._done(len(self._records)))

    def _advance(self, watermark: int) -> None:
        self._watermark = max(self._watermark, watermark)

    def _fresh(self) -> StoreRecords | SendAck:
        # records ascend (the codec checked it): the duplicates are a prefix
        i = bisect.bisect_right(self._records, self._watermark, key=_seq)
        self._duplicates = i
        self._records = self._records[i:]
        if not self._records:
            return self._done(0)
        return StoreRecords(tuple(self._records))

    def _done(self, fresh: int) -> SendAck:
        ack = SendAck(self._watermark, fresh, self._duplicates)
        self._records = []
        self._duplicates = 0
        return ack
