"""Flow control of a terminal stream's data bytes, sans-IO, for either end.

Theory of operation
-------------------
Each end of a terminal stream sends ``term_data`` one way and receives it the other way, and
acknowledges what it received with ``term_ack(consumed)``: ``consumed`` is the running total
of data bytes it has passed on (to the operator, or into the device's process). One
:class:`TerminalWindow` per stream keeps both halves:

* sender half: data may be sent while fewer than ``window`` bytes are unacknowledged
  (:meth:`~TerminalWindow.can_send`); the driver records what it sent (:meth:`on_sent`) and the
  peer's acks (:meth:`on_ack`), and waits for an ack while the window is shut. A chunk is
  admitted as a whole, so the bytes in flight may pass ``window`` by at most one chunk, and a
  chunk larger than the window can never get stuck.
* receiver half: the driver reports the data bytes it passed on (:meth:`on_delivered`), which
  returns :class:`SendAck` once ``ack_every`` bytes (a quarter of the window by default) went
  unacknowledged: the driver sends ``term_ack(consumed=ack.consumed)``.

Interactive traffic stays far below the window and is never held back; ``yes`` or a large
upload meets backpressure instead of growing buffers. An ack for bytes never sent is the
peer's protocol error (:class:`~margo_stream.errors.RemoteProtocolError`); an older ack than
one already seen is harmless and ignored.

Usage (either end)::

    window = TerminalWindow()
    # sending
    while not window.can_send():
        await <the window reopening>
    stream.send(TermData(...)); window.on_sent(len(data))
    # a term_ack arrived
    if window.on_ack(msg.consumed): <wake the sender>
    # term_data passed on
    if (ack := window.on_delivered(len(msg.data))) is not None:
        stream.send(TermAck(consumed=ack.consumed))
"""

from __future__ import annotations

from dataclasses import dataclass

from margo_stream.errors import RemoteProtocolError
from margo_stream.protocol.codes import ErrorCode

WINDOW = 256 * 1024  # unacknowledged data bytes either way


@dataclass(frozen=True, slots=True)
class SendAck:
    """Send ``term_ack(consumed=consumed)`` now."""

    consumed: int


class TerminalWindow:
    __slots__ = ("window", "ack_every", "_sent", "_acked", "_delivered", "_ack_sent")

    def __init__(self, window: int = WINDOW, ack_every: int | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 byte, not {window!r}")
        ack_every = max(1, window // 4) if ack_every is None else ack_every
        if not 1 <= ack_every <= window:
            raise ValueError(f"ack_every must be between 1 and the window, not {ack_every!r}")
        self.window = window
        self.ack_every = ack_every
        self._sent = 0  # data bytes sent
        self._acked = 0  # ... of which the peer passed on
        self._delivered = 0  # data bytes received and passed on
        self._ack_sent = 0  # ... of which we acknowledged

    # --- sender half ------------------------------------------------------------------------------
    @property
    def sent(self) -> int:
        return self._sent

    @property
    def acked(self) -> int:
        return self._acked

    @property
    def in_flight(self) -> int:
        """Bytes sent and not yet acknowledged."""
        return self._sent - self._acked

    def can_send(self) -> bool:
        """True while fewer than ``window`` bytes are unacknowledged."""
        return self._sent - self._acked < self.window

    def on_sent(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot send {n} bytes")
        self._sent += n

    def on_ack(self, consumed: int) -> bool:
        """Record the peer's ``term_ack``; returns :meth:`can_send` after it."""
        if consumed > self._sent:
            raise RemoteProtocolError(
                f"term_ack for {consumed} bytes, only {self._sent} were sent",
                ErrorCode.PROTOCOL_ERROR,
            )
        self._acked = max(self._acked, consumed)
        return self.can_send()

    # --- receiver half ----------------------------------------------------------------------------
    @property
    def delivered(self) -> int:
        return self._delivered

    @property
    def ack_sent(self) -> int:
        return self._ack_sent

    def on_delivered(self, n: int) -> SendAck | None:
        """Record ``n`` data bytes passed on; an ack to send when one is due."""
        if n < 0:
            raise ValueError(f"cannot deliver {n} bytes")
        self._delivered += n
        if self._delivered - self._ack_sent >= self.ack_every:
            self._ack_sent = self._delivered
            return SendAck(self._delivered)
        return None
