"""Which congestion controller QUIC connections use (aioquic offers both).

aioquic's default is NewReno. Over a link that loses 2 % of its packets with 50 ms of delay,
Reno's halving at every loss kept our bulk transfers at 0.76 Mbit/s where the kernel's TCP
(CUBIC) reached 1.81; CUBIC grows its window back along a cubic curve after a loss and is what
TCP uses on Linux, so QUIC and the TCP carrier compete on the same terms. Both ends may choose
(``--congestion-control``); each governs what *it* sends (bench/RESULTS.md, "networks").
"""

from __future__ import annotations

from typing import Final, Literal

CongestionControl = Literal["cubic", "reno"]
CONGESTION_CONTROLS: Final = ("cubic", "reno")
DEFAULT_CONGESTION_CONTROL: Final[CongestionControl] = "cubic"
