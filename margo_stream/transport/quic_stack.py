"""Which QUIC implementation an agent dials with: ``aioquic`` (the default) or ``qh3``.

- ``aioquic``: every packet handled in Python, with our hooks (``mtls_hook``): the ``rate``
  congestion controller for what the agent sends (``--congestion-control``), ACK timing, and
  bounded receive credit. The controller always runs aioquic.
- ``qh3``: packets handled by qh3's native core (``margo_stream.transport.qh3_connection``),
  about a ninth of aioquic's CPU a datagram; its congestion controller is its own (loss-based),
  so ``--congestion-control`` does not apply. For devices whose CPU is the scarce resource and
  whose links do not lose packets at random.
"""

from __future__ import annotations

from typing import Final, Literal

QuicStack = Literal["aioquic", "qh3"]
QUIC_STACKS: Final = ("aioquic", "qh3")
DEFAULT_QUIC_STACK: Final[QuicStack] = "aioquic"
