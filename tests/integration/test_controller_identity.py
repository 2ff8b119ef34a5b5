"""The controller proves its identity per tenant: real certificates, a real controller process
and real agents over loopback QUIC, and the Margo REST API's TLS listener.

An agent sends its tenant as the TLS server name and trusts only its tenant's CA; the
controller presents that tenant's fleet-manager certificate (``spiffe://<tenant>/margo/wfm/...``)
and the agent checks the leaf after the handshake. A controller that presents anything else is
refused by the agent (counted, logged) and no device connects.
"""

from __future__ import annotations

import shutil
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from controller.device_api.rest_poll import serve_rest_poll
from controller.device_api.tls import tenant_bundle_paths
from controller.store.sqlite import SqliteStore
from margo_stream.identity.fleet_manager import uri_sans
from margo_stream.identity.pki import (
    CLOCK_SKEW,
    cert_to_pem,
    key_to_pem,
    load_tenant_ca,
    make_leaf,
)
from margo_stream.identity.verify import PeerVerifier
from tests.harness import Agent, Controller, Pki, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _wfm_dir(pki: Pki, tenant: str) -> Path:
    return pki.dir / tenant / "controller"


def _present(pki: Pki, tenant: str, cert: x509.Certificate, key: object) -> None:
    """Make the controller present ``cert`` to ``tenant``'s agents."""
    d = _wfm_dir(pki, tenant)
    (d / "cert.pem").write_bytes(cert_to_pem(cert))
    (d / "key.pem").write_bytes(key_to_pem(key))  # type: ignore[arg-type]


def _acme_issued(pki: Pki, uri: str) -> tuple[x509.Certificate, object]:
    """A serverAuth certificate from acme's own CA, DNS name acme, with the given URI SAN."""
    ca, ca_key = load_tenant_ca(pki.dir, "acme")
    now = datetime.now(UTC)
    return make_leaf(
        ca,
        ca_key,
        uris=[uri],
        not_before=now - CLOCK_SKEW,
        not_after=now + timedelta(days=1),
        eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
        common_name="acme",
        dns_names=["acme"],
        ip_addresses=["127.0.0.1"],
    )


def test_an_acme_agent_sees_acmes_fleet_manager(pki: Pki, tmp_path: Path) -> None:
    ctl = Controller(pki, tmp_path / "data")
    agent = Agent(pki.device("acme", "press-01"), ctl.quic, tmp_path / "acme-agent")
    other = Agent(pki.device("globex", "press-01"), ctl.quic, tmp_path / "globex-agent")
    try:
        ctl.wait_connected(pki.token("acme"), "press-01")
        ctl.wait_connected(pki.token("globex"), "press-01")
        seen = wait_for(lambda: agent.status().get("controller_id"), what="acme's status")
        assert seen == "spiffe://acme/margo/wfm/controller"
        seen = wait_for(lambda: other.status().get("controller_id"), what="globex's status")
        assert seen == "spiffe://globex/margo/wfm/controller"
        assert agent.status()["refusals"] == 0
        assert "connected to" in agent.log() and "spiffe://acme/margo/wfm/controller" in agent.log()
    finally:
        agent.stop()
        other.stop()
        ctl.stop()


def _globex_issued(pki: Pki) -> None:
    for name in ["cert.pem", "key.pem"]:
        shutil.copy(_wfm_dir(pki, "globex") / name, _wfm_dir(pki, "acme") / name)


def _acme_device_as_server(pki: Pki) -> None:
    ident = pki.device("acme", "not-a-controller")
    for name in ["cert.pem", "key.pem"]:
        shutil.copy(ident / name, _wfm_dir(pki, "acme") / name)


def _other_trust_domain(pki: Pki) -> None:
    _present(pki, "acme", *_acme_issued(pki, "spiffe://globex/margo/wfm/controller"))


def _no_wfm_uri(pki: Pki) -> None:
    _present(pki, "acme", *_acme_issued(pki, "spiffe://acme/margo/client/impostor"))


@pytest.mark.parametrize(
    ("replace", "logged"),
    [
        (_globex_issued, "refusing the controller at"),  # chain: not acme's CA (TLS alert)
        (_acme_device_as_server, "refusing the controller at"),  # no DNS name acme (TLS)
        (_other_trust_domain, "controller certificate is for trust domain 'globex', not 'acme'"),
        (_no_wfm_uri, "names 'spiffe://acme/margo/client/impostor', not a fleet manager"),
    ],
    ids=["globex-issued", "device-certificate", "other-trust-domain", "no-wfm-uri"],
)
def test_an_acme_agent_refuses_any_other_controller_certificate(
    pki: Pki, tmp_path: Path, replace: object, logged: str
) -> None:
    replace(pki)  # type: ignore[operator]
    ctl = Controller(pki, tmp_path / "data")
    agent = Agent(pki.device("acme", "press-01"), ctl.quic, tmp_path / "acme-agent")
    try:
        wait_for(lambda: agent.status().get("refusals", 0) >= 2, what=f"refusals\n{agent.log()}")
        assert logged in agent.log()
        status = agent.status()
        assert status["connects"] == 0 and status["controller_id"] is None
        assert "controller refused" in status["last_error"]
        assert ctl.get(pki.token("acme"), "/devices").json()["items"] == []  # nothing connected
    finally:
        agent.stop()
        ctl.stop()


# --------------------------------------------------------------------------- the REST API


def _presented(port: int, server_name: str | None, cafile: Path, ident: Path) -> x509.Certificate:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(cafile))
    ctx.load_cert_chain(str(ident / "cert.pem"), str(ident / "key.pem"))
    ctx.check_hostname = server_name is not None
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name or "127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_margo_api_presents_the_tenant_certificate_by_server_name(
    pki: Pki, tmp_path: Path, anyio_backend: str
) -> None:
    store = SqliteStore(tmp_path / "controller.db")
    await store.open()
    ident = pki.device("acme", "press-01")
    try:
        async with anyio.create_task_group() as tg:
            server = await tg.start(
                serve_rest_poll,
                store,
                PeerVerifier.from_dir(pki.dir),
                "127.0.0.1",
                0,
                pki.dir / "controller" / "cert.pem",
                pki.dir / "controller" / "key.pem",
                tenant_bundle_paths(pki.dir),
            )
            for tenant in ["acme", "globex"]:
                leaf = await anyio.to_thread.run_sync(
                    _presented, server.port, tenant, pki.dir / tenant / "ca.pem", ident
                )
                assert uri_sans(leaf) == [f"spiffe://{tenant}/margo/wfm/controller"]
            # no server name (an address): the default identity, DIR/controller/
            leaf = await anyio.to_thread.run_sync(
                _presented, server.port, None, pki.dir / "controller" / "ca.pem", ident
            )
            assert uri_sans(leaf) == [] and leaf.subject.rfc4514_string() == "CN=localhost"
            tg.cancel_scope.cancel()
    finally:
        await store.close()
