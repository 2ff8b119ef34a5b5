"""The bench's QUIC device (``bench.transports.quic.QuicClient``) against a real controller on
loopback: the same small conformance test as the other transports (apply, status, delete), the
operator's API on one side, the device's verified desired state on the other."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import httpx
import pytest

from bench.fleet import TENANT, ServerSide, operator_token, prepare_pki
from bench.fleet_worker import device_name
from bench.pushlat import document
from bench.signing import Signer
from bench.transports.quic import QuicClient
from margo_stream.identity.trust import load_signing_pub
from margo_stream.transport.quic_stack import QuicStack

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(60)]
WAIT = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("stack", ["aioquic", "qh3"])
async def test_quic_client_apply_status_delete(tmp_path: Path, stack: QuicStack) -> None:
    identities = prepare_pki(tmp_path, 1)
    server = ServerSide("quic", tmp_path, "t")
    await server.start()
    client = QuicClient(
        identities / device_name(0),
        *server.device_addr,
        state_dir=tmp_path / "dev",
        quic_stack=stack,  # as the agent's --quic-stack
    )
    api = httpx.AsyncClient(
        base_url=server.api,
        timeout=30,
        headers={"Authorization": f"Bearer {operator_token(tmp_path)}"},
    )
    try:
        await client.connect()
        assert (
            type(client.conn).__name__ == {"aioquic": "Connection", "qh3": "Qh3Connection"}[stack]
        )
        dev = client.device_id
        signer = Signer.for_tenant(tmp_path / "certs", TENANT)
        body = signer.body([document("one")], devices=[dev])
        r = await api.post("/api/v1/deployments", json=body)
        r.raise_for_status()
        with anyio.fail_after(WAIT):
            first = await client.next_desired()
        controller_key = load_signing_pub(identities / device_name(0) / "signing.pub")
        manifest = first.verify(controller_key, client.tenant, dev)
        assert [e.deployment_id for e in manifest.deployments] == ["bench-probe"]
        with anyio.fail_after(WAIT):  # the trust state advances on disk right after delivery
            while client.verifier.held_version != first.version:
                await anyio.sleep(0.01)
        await client.post_status(
            "bench-probe", first.version, "installed", [{"name": "probe", "state": "installed"}]
        )
        r = await api.get("/api/v1/deployments", params={"device": dev})
        item = r.json()["items"][0]
        assert (item["state"], item["manifestVersion"]) == ("installed", first.version)

        r = await api.delete(f"/api/v1/devices/{dev}/deployments/bench-probe")
        assert r.status_code == 204
        with anyio.fail_after(WAIT):
            second = await client.next_desired()
        assert second.version > first.version
        assert second.verify(controller_key, client.tenant, dev).deployments == ()
        counters = client.counters
        assert counters.updates == 2 and counters.bytes_sent > 0
        assert counters.bytes_received > len(first.manifest_bytes) + len(second.manifest_bytes)
        t0 = time.monotonic()
        await client.post_status("bench-probe", second.version, "removed", [])
        assert time.monotonic() - t0 < WAIT
    finally:
        await client.close()
        await api.aclose()
        await server.stop()
