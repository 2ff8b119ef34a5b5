"""The channel's carrier hooks over a sans-IO QUIC connection, for both stacks the agent may
dial with (aioquic's ``QuicConnection`` and qh3's expose the same calls): a channel stream is
a QUIC bidirectional stream with the same id; an end is a FIN; a reset is RESET_STREAM plus
STOP_SENDING with our error code; a close is CONNECTION_CLOSE with our code and reason. Also
what drives either stack from the loop: one loop timer at the deadline the stack asks for, and
one flush per loop turn."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Protocol

from margo_stream.transport.channel_connection import ChannelConnection


class SansIoQuic(Protocol):
    """What the hooks call on either stack's connection."""

    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int: ...
    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int) -> None: ...
    def stop_stream(self, stream_id: int, error_code: int) -> None: ...
    def send_ping(self, uid: int) -> None: ...
    def next_event(self) -> Any: ...
    def handle_timer(self, now: float) -> None: ...
    def close(
        self, error_code: int = ..., frame_type: int | None = ..., reason_phrase: str = ...
    ) -> None: ...


class QuicStreamsCarrier(ChannelConnection):
    """``ChannelConnection``'s carrier hooks on ``self.quic`` (set by the subclass, which
    narrows its type to its stack's connection)."""

    quic: SansIoQuic
    timer_at: float | None = None  # the deadline the loop timer is set for
    _timer: asyncio.TimerHandle | None = None
    _transmit_handle: asyncio.Handle | None = None  # this turn's flush, when one is queued

    def quic_event(self, event: Any) -> None:
        """One event of the stack (the subclass knows its stack's event types)."""
        raise NotImplementedError

    def _drain_events(self) -> None:
        quic = self.quic
        event = quic.next_event()
        while event is not None:
            if not self._guarded(type(event).__name__, functools.partial(self.quic_event, event)):
                return
            event = quic.next_event()

    def process_events(self) -> None:
        self._drain_events()
        self.transmit()

    def _carrier_close(self, code: int, reason: str) -> None:
        self.quic.close(error_code=int(code), reason_phrase=reason)
        self.transmit()

    def _carrier_open(self) -> int:
        quic = self.quic
        stream_id = quic.get_next_available_stream_id(is_unidirectional=False)
        # Claim the id in the stack now (an empty write creates the stream), so two streams
        # opened before either has sent anything never share an id.
        quic.send_stream_data(stream_id, b"", end_stream=False)
        return stream_id

    def _carrier_send(self, stream_id: int, data: bytes, end: bool) -> None:
        self.quic.send_stream_data(stream_id, data, end_stream=end)

    def _carrier_finish(self, stream_id: int) -> None:
        try:
            self.quic.send_stream_data(stream_id, b"", end_stream=True)
        except (ValueError, AssertionError):
            pass  # a stream we cannot send on (unidirectional), or already finished

    def _carrier_reset(self, stream_id: int, code: int) -> None:
        try:
            self.quic.reset_stream(stream_id, code)
        except (ValueError, AssertionError):
            pass  # already finished in that direction
        try:
            self.quic.stop_stream(stream_id, code)
        except (ValueError, AssertionError):
            pass

    def _carrier_ping(self) -> None:
        self.quic.send_ping(0)

    # --- the loop drives the stack ------------------------------------------------------------------
    def _set_loop_timer(self, timer_at: float | None) -> None:
        """The loop timer at ``timer_at`` (None: none), moved only when the deadline moved."""
        if timer_at == self.timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if timer_at is not None:
            self._timer = self.loop.call_at(timer_at, self._on_timer)
        self.timer_at = timer_at

    def _queue_flush(self) -> None:
        if self._transmit_handle is None:
            self._transmit_handle = self.loop.call_soon(self._scheduled_transmit)

    def _scheduled_transmit(self) -> None:
        self._transmit_handle = None
        self.transmit()

    def _take_queued_flush(self) -> None:
        """A transmit now does the queued flush's work: the flush is not run as well."""
        if self._transmit_handle is not None:
            self._transmit_handle.cancel()
            self._transmit_handle = None

    def _on_timer(self) -> None:
        self._timer = None
        self.timer_at = None
        self.fire_timer(self.loop.time())

    def fire_timer(self, now: float) -> None:
        """The stack's timer is due (``now``: not before the deadline it asked for)."""
        self.quic.handle_timer(now=now)
        self.process_events()

    def cancel_timer(self) -> None:
        self._set_loop_timer(None)
