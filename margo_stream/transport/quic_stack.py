"""Which QUIC implementation an agent dials with: ``qh3`` (the default) or ``aioquic``.

- ``qh3``: packets handled by qh3's native core (``margo_stream.transport.qh3_connection``),
  about a quarter of aioquic's CPU for a push's packets (``margo-bench quic-stacks``), which
  put QUIC ahead of HTTP/2 push on the bench's fan-outs (bench/RESULTS.md, issue 20). Its
  congestion controller is its own (loss-based), so ``--congestion-control`` does not apply.
- ``aioquic``: every packet handled in Python, with our hooks (``mtls_hook``): the ``rate``
  congestion controller for what the agent sends (``--congestion-control``), which keeps an
  agent's uploads moving over a link that loses packets at random, ACK timing, sliding
  receive credit. ``margo-agent --congestion-control ...`` alone selects it, as before there
  was a choice.

The controller always runs aioquic.
"""

from __future__ import annotations

from typing import Final, Literal

QuicStack = Literal["aioquic", "qh3"]
QUIC_STACKS: Final = ("aioquic", "qh3")
DEFAULT_QUIC_STACK: Final[QuicStack] = "qh3"
