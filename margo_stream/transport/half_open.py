"""Which new QUIC handshakes the controller takes up, asks to prove their address first, or drops.

A *half-open* handshake is a server connection object that exists while its handshake
(including the controller's identity check) has not completed. Each costs tens of kilobytes
and a TLS context, and one undecryptable 1,200-byte Initial from a spoofed address is enough
to make one. So the endpoint asks :class:`HalfOpenPolicy` before it creates one, with the
client's source IP, whether the Initial carried a valid Retry token (the client proved it
receives our packets at that address, ``retry.py``) and the time; the answer is:

- ``ACCEPT``: create the connection;
- ``RETRY``: answer with a stateless Retry (no state kept) and let the client come back with a
  token;
- ``DROP``: ignore the packet (the client retransmits; a real device gets in once the load
  passes).

Caps (both also bound this class's own memory):

- ``max_half_open`` handshakes in total, validated or not: beyond it everything is dropped;
- ``max_half_open_per_address`` *unvalidated* handshakes per source IP: beyond it a Retry when
  Retry is enabled, else a drop. A validated Initial is not held to this cap (its sender proved
  the address is its own, and many devices behind one NAT share an IP) but counts in the total.

Modes (``--quic-retry``):

- ``always``: every Initial without a valid token gets a Retry: no state for an unproven
  address, at the cost of one round trip per handshake;
- ``never``: no Retry; the caps drop what is beyond them;
- ``auto`` (the default): Retry once the handshakes half-open in total reach
  ``retry_threshold`` (and for a source over its per-address cap), and stay in Retry for
  ``hold`` seconds after they were last that many, so a flood does not re-fill the unproven
  slots each time a batch of them times out.

The threshold is ``max_half_open // 16`` (at least 1): 128 with the default 2,048. Half-open
handshakes at once are the handshake rate times the handshake's duration: one controller core
completes a few hundred handshakes a second (GUIDE.md: about 330 for bare aioquic, fewer with
mutual TLS), and a device a few hundred milliseconds of round trips away takes two round
trips, so even a reconnect storm at full rate keeps about 100 half-open: below the threshold,
it pays no Retry round trip. A flood
of Initials reaches it within a fraction of a second. Scaling with ``max_half_open`` keeps
unproven handshakes to a sixteenth of the total in ``auto``: the other fifteen sixteenths stay
free for clients that answered a Retry, so a flood can never fill the total and lock real
devices out (with ``never`` it can, for ``handshake_timeout`` at a time).

Sans-IO: no clock, no sockets; the endpoint reports each handshake's start and end.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RetryMode(enum.StrEnum):
    ALWAYS = "always"
    AUTO = "auto"
    NEVER = "never"


class Decision(enum.Enum):
    ACCEPT = "accept"
    RETRY = "retry"
    DROP = "drop"


THRESHOLD_SHARE = 16  # auto: Retry from max_half_open // THRESHOLD_SHARE half-open
DEFAULT_HOLD = 10.0


@dataclass(slots=True)
class HalfOpenPolicy:
    mode: RetryMode = RetryMode.AUTO
    max_half_open: int = 2048
    max_half_open_per_address: int = 256
    retry_threshold: int = 0  # 0: max_half_open // THRESHOLD_SHARE, at least 1
    hold: float = DEFAULT_HOLD  # auto: seconds Retry stays on after the threshold was reached
    _total: int = 0
    _unvalidated: dict[str, int] = field(default_factory=dict)  # per source IP, > 0 only
    _loaded_at: float | None = None  # when the total was last at or over the threshold

    def __post_init__(self) -> None:
        self.mode = RetryMode(self.mode)
        if self.max_half_open < 1 or self.max_half_open_per_address < 1:
            raise ValueError("max_half_open and max_half_open_per_address must be >= 1")
        if self.retry_threshold < 0 or self.hold < 0:
            raise ValueError("retry_threshold and hold must be >= 0")
        if self.retry_threshold == 0:
            self.retry_threshold = max(1, self.max_half_open // THRESHOLD_SHARE)

    # --- the decision -------------------------------------------------------------------------
    def decide(self, address: str, validated: bool, now: float) -> Decision:
        """What to do with a new Initial from ``address`` (its IP), with or without a valid
        Retry token, at ``now``."""
        if self._total >= self.max_half_open:
            return Decision.DROP
        if validated:
            return Decision.ACCEPT
        over_address_cap = self._unvalidated.get(address, 0) >= self.max_half_open_per_address
        if self.mode is RetryMode.NEVER:
            return Decision.DROP if over_address_cap else Decision.ACCEPT
        if self.mode is RetryMode.ALWAYS:
            return Decision.RETRY
        loaded = self.under_load(now)  # first: it notes when the load was last seen
        return Decision.RETRY if loaded or over_address_cap else Decision.ACCEPT

    def under_load(self, now: float) -> bool:
        """``auto``: the half-open handshakes reach the threshold, or did less than ``hold``
        seconds ago."""
        if self._total >= self.retry_threshold:
            self._loaded_at = now
            return True
        return self._loaded_at is not None and now - self._loaded_at < self.hold

    # --- what the endpoint reports ------------------------------------------------------------
    def opened(self, address: str, validated: bool) -> None:
        """A connection was created on ``ACCEPT``."""
        self._total += 1
        if not validated:
            self._unvalidated[address] = self._unvalidated.get(address, 0) + 1

    def closed(self, address: str, validated: bool) -> None:
        """That connection is no longer half-open: its handshake completed, it ended, or it
        timed out. Once per ``opened``."""
        self._total -= 1
        if not validated:
            left = self._unvalidated.get(address, 0) - 1
            if left > 0:
                self._unvalidated[address] = left
            else:
                self._unvalidated.pop(address, None)

    @property
    def total(self) -> int:
        return self._total

    def unvalidated(self, address: str) -> int:
        return self._unvalidated.get(address, 0)


__all__ = ["Decision", "HalfOpenPolicy", "RetryMode", "THRESHOLD_SHARE"]
