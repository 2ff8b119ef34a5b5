"""An in-test QUIC client that speaks the real protocol with any certificate, good or bad."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
from aioquic.quic.configuration import QuicConfiguration

from margo_stream.identity.pki import cert_to_pem, key_to_pem, load_tenant_ca, make_leaf
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ALPN
from margo_stream.transport.connection import Connection
from margo_stream.transport.quic_client import connect


def craft(
    pki_dir: Path,
    out: Path,
    *,
    signer: str,
    uris: list[str],
    expired: bool = False,
    common_name: str = "crafted",
) -> tuple[Path, Path]:
    """A client certificate signed by tenant ``signer``'s CA with the given URI SANs."""
    ca_cert, ca_key = load_tenant_ca(pki_dir, signer)
    now = datetime.now(UTC)
    nb, na = (
        (now - timedelta(days=3), now - timedelta(days=1))
        if expired
        else (now - timedelta(minutes=5), now + timedelta(days=1))
    )
    cert, key = make_leaf(
        ca_cert, ca_key, uris=uris, not_before=nb, not_after=na, common_name=common_name
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "cert.pem").write_bytes(cert_to_pem(cert))
    (out / "key.pem").write_bytes(key_to_pem(key))
    return out / "cert.pem", out / "key.pem"


def configuration(pki_dir: Path, cert: Path | None, key: Path | None) -> QuicConfiguration:
    conf = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], server_name="localhost", idle_timeout=10
    )
    if cert is not None:
        conf.load_cert_chain(str(cert), str(key))
    conf.load_verify_locations(cafile=str(pki_dir / "controller" / "ca.pem"))
    return conf


async def open_connection(port: int, conf: QuicConfiguration) -> Connection:
    conn, transport = await connect("127.0.0.1", port, conf)
    conn._test_transport = transport  # type: ignore[attr-defined]
    with anyio.fail_after(5):
        await conn.wait_handshake()
    return conn


def hello(device_id: str) -> m.Hello:
    return m.Hello(
        device_id=device_id, agent_version="test", capabilities=m.Capabilities(id=device_id)
    )


async def say_hello(conn: Connection, device_id: str) -> object:
    control = conn.open_stream()
    control.send(hello(device_id))
    with anyio.fail_after(5):
        return await control.receive()
