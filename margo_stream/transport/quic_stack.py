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

from aioquic.quic.configuration import QuicConfiguration

from margo_stream.transport.congestion import DEFAULT_CONGESTION_CONTROL, CongestionControl
from margo_stream.transport.qh3_connection import Qh3Configuration, qh3_configuration
from margo_stream.transport.quic_client import client_configuration

QuicStack = Literal["aioquic", "qh3"]
QUIC_STACKS: Final = ("aioquic", "qh3")
DEFAULT_QUIC_STACK: Final[QuicStack] = "qh3"


def agent_configuration(
    stack: QuicStack,
    cert_path: str,
    key_path: str,
    ca_path: str,
    *,
    server_name: str,
    idle_timeout: float = 60.0,
    congestion_control: CongestionControl = DEFAULT_CONGESTION_CONTROL,
) -> QuicConfiguration | Qh3Configuration:
    """The agent's QUIC configuration on ``stack`` (``agent.carriers.dial_quic`` dials the stack
    the configuration is for); ``congestion_control`` applies to aioquic only."""
    if stack == "qh3":
        return qh3_configuration(
            cert_path, key_path, ca_path, server_name=server_name, idle_timeout=idle_timeout
        )
    return client_configuration(
        cert_path,
        key_path,
        ca_path,
        server_name=server_name,
        idle_timeout=idle_timeout,
        congestion_control=congestion_control,
    )
