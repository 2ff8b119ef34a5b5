"""The bench's HTTP/2 push and REST poll devices (``bench.fleet_worker.Worker`` with its
``DeviceTrust``) against a real controller on loopback: each it holds an update whose deployment an operator of its
tenant's root signed, and refuses one whose deployment signature is by an operator the pinned
root never certified (what a controller holding every controller key, but no operator key, can
relay), reporting the refusal as the bench does: an error of the device, a failure sample, the
trust state not advanced. The controller runs in this process, so the test can forge through
its store as in ``tests/integration/test_authority_e2e.py``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.fleet import ENDPOINT, TENANT, operator_token, prepare_pki
from bench.fleet_worker import Worker
from bench.pushlat import document
from bench.signing import Signer
from controller.config import ControllerConfig
from controller.service import Controller
from controller.store.base import DeploymentDraft
from margo_stream.identity.authored import sign_deployment
from margo_stream.identity.authority import Role, make_operator_cert
from margo_stream.identity.envelope import canonical
from margo_stream.state.digest import sha256_digest
from margo_stream.state.documents import parse_deployment

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(60)]
WAIT = 15.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _until(predicate: object) -> None:
    with anyio.fail_after(WAIT):
        while not predicate():  # type: ignore[operator]
            await anyio.sleep(0.02)  # the worker offers no event to wait on


async def _forge_rogue_operator(ctl: Controller, device: str, value: str) -> str:
    """A deployment signed by "mallory", whose operator certificate a root key of nobody's
    tenant signed, stored and pushed as a compromised controller could; returns its digest."""
    now = dt.datetime.now(dt.UTC)
    rogue_root, key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    cert = canonical(
        make_operator_cert(
            TENANT,
            "mallory",
            [Role.DEPLOYER],
            key.public_key(),
            issued=now - dt.timedelta(minutes=1),
            expires=now + dt.timedelta(days=1),
            signers=[rogue_root],
        )
    )
    doc = document(value).encode()
    dep = parse_deployment(doc)
    signature = sign_deployment(TENANT, dep.deployment_id, sha256_digest(doc), key, now=now)
    await ctl.store.apply(
        TENANT,
        blobs=[cert],
        deployments=[
            DeploymentDraft(
                deployment_id=dep.deployment_id,
                document=doc,
                name=dep.name,
                profile=str(dep.profile),
                signature=canonical(signature).decode(),
                certificate=sha256_digest(cert),
            )
        ],
        devices=[device],
    )
    await ctl.desired.desired_changed(TENANT, [device])
    return sha256_digest(doc)


@pytest.mark.parametrize("transport", ["h2-push", "rest-poll"])
async def test_device_holds_an_operators_update_and_refuses_a_rogue_one(
    transport: str, tmp_path: Path
) -> None:
    identities = prepare_pki(tmp_path, 1)
    ctl = Controller(
        ControllerConfig(
            certs=tmp_path / "certs",
            data=tmp_path / "data",
            listen_port=0,
            api_port=0,
            h2_push_host="127.0.0.1",
            margo_api_host="127.0.0.1",
        )
    )
    signer = Signer.for_tenant(tmp_path / "certs", TENANT)
    async with anyio.create_task_group() as tg:
        await tg.start(ctl.run)
        worker = Worker(
            {
                "transport": transport,
                "host": "127.0.0.1",
                "port": ctl.device_ports[ENDPOINT[transport]],
                "identities": str(identities),
                "state": str(tmp_path / "state"),
                "tenant": TENANT,
                "first": 0,
                "count": 1,
                "poll_interval": 0.05,
            }
        )
        dev = worker.devices[0]
        api = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{ctl.api_port}/api/v1",
            timeout=10,
            headers={"Authorization": f"Bearer {operator_token(tmp_path)}"},
        )
        try:
            tg.start_soon(worker.run_device, dev, 0.0)
            await _until(lambda: dev.connected_at is not None)
            assert dev.trust is not None
            # provisioned with the tenant's root metadata, which the controller relays too
            assert dev.trust.verifier.root_version == len(worker.root_chain) >= 1

            # 1. an operator of the pinned root signed it: held (trust state on disk), reported
            r = await api.post(
                "/deployments", json=signer.body([document("good")], devices=[dev.name])
            )
            assert r.status_code == 200, r.text
            await _until(lambda: worker.got)
            index, version, delivered, acked = worker.got[0]
            assert (index, dev.version) == (dev.index, version) and delivered <= acked
            assert dev.trust.verifier.held_version == version
            r = await api.get("/deployments", params={"device": dev.name})
            item = r.json()["items"][0]
            assert (item["state"], item["manifestVersion"]) == ("installed", version)

            # 2. signed by an operator the pinned root never certified: refused, reported as
            # the bench reports a refusal, nothing advanced
            await _forge_rogue_operator(ctl, dev.name, "evil")
            await _until(lambda: dev.errors >= 1)
            assert dev.errors == 1 and len(worker.got) == 1
            assert worker.failures[0].startswith("AuthorityError: ")
            assert "mallory" in worker.failures[0]
            assert dev.trust.verifier.held_version == version == dev.version

            # 3. the device reconnected, and the next operator's update is held again
            r = await api.post(
                "/deployments", json=signer.body([document("good-2")], devices=[dev.name])
            )
            assert r.status_code == 200, r.text
            await _until(lambda: len(worker.got) == 2)
            assert dev.trust.verifier.held_version == worker.got[1][1] > version + 1
            assert dev.errors == 1
        finally:
            worker.stopping = True
            await api.aclose()
            ctl.shutdown()
            tg.cancel_scope.cancel()
