"""Which congestion controller QUIC connections use (aioquic offers both).

aioquic's default is NewReno. Over a link that loses 2 % of its packets with 50 ms of delay,
Reno's halving at every loss kept our bulk transfers at 0.76 Mbit/s where the kernel's TCP
(CUBIC) reached 1.81; CUBIC grows its window back along a cubic curve after a loss and is what
TCP uses on Linux. ``rate`` (``margo_stream.transport.rate_cc``) models the path's bandwidth and
round trip instead of reacting to every loss, for links that lose packets at random. Both ends
may choose (``--congestion-control``); each governs what *it* sends (bench/RESULTS.md,
"networks").
"""

from __future__ import annotations

from typing import Final, Literal

from margo_stream.transport import rate_cc  # registers "rate" with aioquic

CongestionControl = Literal["cubic", "reno", "rate"]
CONGESTION_CONTROLS: Final = ("cubic", "reno", rate_cc.NAME)
DEFAULT_CONGESTION_CONTROL: Final[CongestionControl] = "cubic"
