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

import asyncio
import dataclasses
from typing import Final, Literal

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from margo_stream.identity.pki import PrivateKey
from margo_stream.transport.congestion import DEFAULT_CONGESTION_CONTROL, CongestionControl
from margo_stream.transport.qh3_connection import (
    Qh3Configuration,
    connect_qh3,
    qh3_configuration,
)
from margo_stream.transport.quic_client import client_configuration, connect
from margo_stream.transport.quic_streams import QuicStreamsCarrier

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
    """The agent's QUIC configuration on ``stack`` (``dial`` dials the stack the configuration
    is for); ``congestion_control`` applies to aioquic only."""
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


def with_identity(
    configuration: QuicConfiguration | Qh3Configuration,
    certificate: x509.Certificate,
    private_key: PrivateKey,
) -> QuicConfiguration | Qh3Configuration:
    """A copy of ``configuration`` presenting this certificate and key (no chain): what a
    simulated fleet gives each of its devices, with no files."""
    if isinstance(configuration, Qh3Configuration):
        copy = dataclasses.replace(configuration)
        copy.load_cert_chain(
            certificate.public_bytes(serialization.Encoding.PEM),
            private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        return copy
    return dataclasses.replace(
        configuration, certificate=certificate, private_key=private_key, certificate_chain=[]
    )


async def dial(
    host: str, port: int, configuration: QuicConfiguration | Qh3Configuration
) -> tuple[QuicStreamsCarrier, asyncio.DatagramTransport]:
    """Start a handshake on the stack ``configuration`` is for; the caller awaits
    ``connection.wait_handshake()`` with a timeout and closes the transport after."""
    if isinstance(configuration, Qh3Configuration):
        return await connect_qh3(host, port, configuration)
    return await connect(host, port, configuration)
