"""Which congestion controller QUIC connections use: ``rate`` (ours) by default, or aioquic's
``cubic`` or ``reno``.

Over an emulated link that loses 2 % of its packets at random with 50 ms each way (a real packet
link: `margo-bench compare --scenario lossy --set link=tun`), the controllers moved bulk data
at: Reno (aioquic's default) and CUBIC about 1.1 Mbit/s, the kernel's TCP (our TCP carrier)
6-9 Mbit/s, ``rate`` 8-9 Mbit/s with QUIC's interactive latency advantage kept
(bench/RESULTS.md, "networks"). Loss-based controllers read every random loss as congestion;
``rate`` (``margo_stream.transport.rate_cc``) models the path's bandwidth and round trip as BBR
does. The trade-off: like BBR it does not back off for random loss, so against loss-based
flows on one shallow-buffered bottleneck it takes more than an even share; ``cubic`` is there
for networks whose owners want the TCP-friendly behaviour. Both ends choose for what *they*
send (``--congestion-control`` on margo-controller and margo-agent).
"""

from __future__ import annotations

from typing import Final, Literal

from margo_stream.transport import rate_cc  # noqa: F401 - registers "rate" with aioquic

CongestionControl = Literal["cubic", "reno", "rate"]
CONGESTION_CONTROLS: Final = ("rate", "cubic", "reno")
DEFAULT_CONGESTION_CONTROL: Final[CongestionControl] = "rate"
