"""Device identity lifecycle end to end: a real controller process, real certificates.

The allow-list admits only identities ``margo-certs device`` (or an enrolment) recorded, with
the recorded key; revocation closes the live connection at once, refuses later handshakes and
survives a restart; a revoked identity cannot be allowed again; CA rotation and allow-list
changes take effect on SIGHUP without a restart.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from margo_stream.identity.allowed_files import write_allowed
from margo_stream.identity.pki import (
    CLOCK_SKEW,
    PrivateKey,
    cert_to_pem,
    key_to_pem,
    load_tenant_ca,
    make_ca,
    make_leaf,
)
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.transport.connection import ConnectionLost
from tests.harness import BIN, Agent, Controller, Pki, free_udp_port, wait_for
from tests.integration.rawclient import configuration, open_connection, say_hello

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def mint(
    pki: Pki, out: Path, device: str, ca: tuple[x509.Certificate, PrivateKey] | None = None
) -> Path:
    """A device identity directory signed straight by a CA (acme's by default), as an agent
    reads it; no allow file is written."""
    ca_cert, ca_key = ca or load_tenant_ca(pki.dir, "acme")
    now = dt.datetime.now(dt.UTC)
    leaf, key = make_leaf(
        ca_cert,
        ca_key,
        uris=[f"spiffe://acme/margo/client/{device}"],
        not_before=now - CLOCK_SKEW,
        not_after=now + dt.timedelta(days=1),
        eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        common_name=device,
    )
    out.mkdir(parents=True)
    (out / "cert.pem").write_bytes(cert_to_pem(leaf))
    (out / "key.pem").write_bytes(key_to_pem(key))
    for name in ("ca.pem", "signing.pub", "root.pub"):
        (out / name).write_bytes((pki.dir / "acme" / name).read_bytes())
    return out


def post(ctl: Controller, token: str, path: str) -> httpx.Response:
    return httpx.post(
        f"{ctl.api}/api/v1{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def margoctl(ctl: Controller, pki: Pki, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MARGO_API": ctl.api, "MARGO_TOKEN_FILE": str(pki.token_file("acme"))}
    return subprocess.run(
        [str(BIN / "margoctl"), *args], env=env, capture_output=True, text=True, timeout=30
    )


async def refused(ctl: Controller, pki: Pki, ident: Path, device: str) -> str:
    """Connect with ``ident``; the controller must refuse it: returns the reason."""
    conf = configuration(pki.dir, ident / "cert.pem", ident / "key.pem")
    conn = await open_connection(ctl.quic_port, conf)
    try:
        with pytest.raises(ConnectionLost) as info:
            await say_hello(conn, device)
    finally:
        conn._test_transport.close()  # type: ignore[attr-defined]
    assert info.value.code == ErrorCode.IDENTITY_REFUSED, info.value.reason
    return info.value.reason


async def test_refused_unless_on_the_allow_list_with_its_key(pki, tmp_path):
    good = pki.device("acme", "press-01")  # margo-certs device: allowed with its key
    ctl = Controller(pki, tmp_path / "data")
    try:
        # a CA-valid certificate for an id margo-certs never issued
        ghost = mint(pki, tmp_path / "ghost", "ghost-01")
        reason = await refused(ctl, pki, ghost, "ghost-01")
        assert reason.startswith("not-allowed: ") and "ghost-01" in reason
        assert ctl.get(pki.token("acme"), "/devices/ghost-01").status_code == 404
        assert ctl.get(pki.token("acme"), "/devices").json()["items"] == []
        # a certificate for an issued id with another key than the recorded one
        forged = mint(pki, tmp_path / "forged", "press-01")
        reason = await refused(ctl, pki, forged, "press-01")
        assert reason.startswith("not-allowed: ") and "another key" in reason
        assert ctl.get(pki.token("acme"), "/devices/press-01").status_code == 404
        # the issued certificates connect, also one issued while the controller runs
        later = pki.device("acme", "press-02")
        for device, ident in (("press-01", good), ("press-02", later)):
            conf = configuration(pki.dir, ident / "cert.pem", ident / "key.pem")
            conn = await open_connection(ctl.quic_port, conf)
            assert isinstance(await say_hello(conn, device), m.HelloAck)
            conn.close()
            conn._test_transport.close()  # type: ignore[attr-defined]
            d = ctl.get(pki.token("acme"), f"/devices/{device}").json()
            assert d["state"] == "allowed"
            now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
            assert d["not_after"].endswith("Z") and d["not_after"] > now
        assert "refused connection" in ctl.log() and "not-allowed" in ctl.log()
    finally:
        ctl.stop()


async def test_revoke_closes_the_session_and_survives_restart(pki, tmp_path):
    port = free_udp_port()
    ident = pki.device("acme", "press-01")
    ctl = Controller(pki, tmp_path / "data", quic_port=port)
    token = pki.token("acme")
    conn = await open_connection(
        port, configuration(pki.dir, ident / "cert.pem", ident / "key.pem")
    )
    agent = None
    try:
        assert isinstance(await say_hello(conn, "press-01"), m.HelloAck)
        ctl.wait_connected(token, "press-01")
        started = time.monotonic()
        r = post(ctl, token, "/devices/press-01/revoke")
        assert r.status_code == 200 and r.json()["state"] == "revoked", r.text
        with anyio.fail_after(2.0):
            lost = await conn.wait_closed()
        assert time.monotonic() - started < 2.0
        assert lost.code == ErrorCode.IDENTITY_REFUSED and lost.reason == "revoked"
        ctl.wait_connected(token, "press-01", connected=False, timeout=2)
        r = margoctl(ctl, pki, "device", "revoke", "press-01", "-o", "json")  # idempotent
        assert r.returncode == 0 and json.loads(r.stdout)["state"] == "revoked", r.stderr
        # later handshakes are refused
        assert (await refused(ctl, pki, ident, "press-01")).startswith("revoked: ")
        # a revoked identity is not allowed again: it must enrol again
        r = post(ctl, token, "/devices/press-01/allow")
        assert r.status_code == 409 and "enrol again" in r.json()["detail"]
        r = margoctl(ctl, pki, "device", "allow", "press-01")
        assert r.returncode == 1 and "enrol again" in r.stderr
        r = margoctl(ctl, pki, "get", "device", "press-01", "-o", "json")
        shown = json.loads(r.stdout)
        assert shown["state"] == "revoked" and shown["not_after"]
        # an agent keeps trying; a restarted controller (the allow files re-imported) still
        # refuses it
        agent = Agent(ident, f"127.0.0.1:{port}", tmp_path / "agent")
        ctl.stop()
        ctl = Controller(pki, tmp_path / "data", quic_port=port)
        assert (await refused(ctl, pki, ident, "press-01")).startswith("revoked: ")
        d = ctl.get(token, "/devices/press-01").json()
        assert d["connected"] is False and d["state"] == "revoked"
        # re-issued with a new key, the device is allowed again (without a restart)
        agent.stop()
        pki.device("acme", "press-01")
        agent = Agent(ident, f"127.0.0.1:{port}", tmp_path / "agent")
        ctl.wait_connected(token, "press-01", timeout=20)
        assert ctl.device(token, "press-01")["state"] == "allowed"
    finally:
        conn._test_transport.close()  # type: ignore[attr-defined]
        if agent is not None:
            agent.stop()
        ctl.stop()


async def test_ca_rotation_and_reload(pki, tmp_path):
    token = pki.token("acme")
    old = pki.device("acme", "press-01")
    ctl = Controller(pki, tmp_path / "data")
    agents = []
    try:
        agents.append(Agent(old, ctl.quic, tmp_path / "old-agent"))
        ctl.wait_connected(token, "press-01")
        # a second CA appended to acme's bundle, and a device it issued (and allowed)
        now = dt.datetime.now(dt.UTC)
        new_ca = make_ca(
            "acme CA 2",
            not_before=now - CLOCK_SKEW,
            not_after=now + dt.timedelta(days=30),
            uris=["spiffe://acme"],
        )
        fresh = mint(pki, tmp_path / "fresh", "press-02", ca=new_ca)
        write_allowed(
            pki.dir,
            "acme",
            "press-02",
            x509.load_pem_x509_certificate((fresh / "cert.pem").read_bytes()),
        )
        bundle = pki.dir / "acme" / "ca.pem"
        bundle.write_bytes(bundle.read_bytes() + cert_to_pem(new_ca[0]))
        reason = await refused(ctl, pki, fresh, "press-02")  # the old bundle is still in force
        assert "trust bundle" in reason
        ctl.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in ctl.log(), what=f"the reload\n{ctl.log_tail()}")
        agents.append(Agent(fresh, ctl.quic, tmp_path / "new-agent"))
        ctl.wait_connected(token, "press-02")
        assert ctl.device(token, "press-01")["connected"] is True  # the old CA still works
        conf = configuration(pki.dir, old / "cert.pem", old / "key.pem")
        conn = await open_connection(ctl.quic_port, conf)  # and a new handshake with it too
        assert isinstance(await say_hello(conn, "press-01"), m.HelloAck)
        conn.close()
        conn._test_transport.close()  # type: ignore[attr-defined]
        # a reload that fails keeps the old state and says why
        (pki.dir / "acme" / "allowed" / "broken.json").write_text("{not json")
        r = post(ctl, token, "/admin/reload")
        assert r.status_code == 422 and "broken.json" in r.json()["detail"], r.text
        assert "reload failed" in ctl.log()
        (pki.dir / "acme" / "allowed" / "broken.json").unlink()
        r = post(ctl, token, "/admin/reload")
        assert r.status_code == 200 and r.json()["tenants"] == ["acme", "globex"], r.text
        other = post(ctl, pki.token("globex"), "/devices/press-01/revoke")
        assert other.status_code == 404  # another tenant's device is not there
        assert ctl.alive()
    finally:
        for agent in agents:
            agent.stop()
        ctl.stop()
