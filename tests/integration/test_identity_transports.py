"""The allow-list on the other device transports (Margo REST pull, HTTP/2 push), whose
connections are kept alive: a revocation refuses the next request on an open REST connection
and closes an HTTP/2 push connection at once. Real servers, real certificates, in process."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from controller.identities import Admission, IdentityBook
from controller.registry import SessionRegistry
from controller.store.sqlite import SqliteStore
from margo_stream.identity.allowed_files import read_allowed_dir
from tests.integration.test_transport_conformance import DEVICE, TENANT, Env, running

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_revocation_reaches_rest_and_h2_connections(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "controller.db")
    await store.open()
    try:
        env = Env(tmp_path, store)  # issues acme/edge-1 and globex/edge-1: both allowed
        for tenant in (TENANT, "globex"):
            await store.device_connected(
                tenant,
                DEVICE,
                capabilities={},
                reported_labels={},
                manifest_version=None,
                remote="test",
            )
        book = IdentityBook(store, SessionRegistry(), env.certs)
        await book.load(read_allowed_dir(env.certs, [TENANT, "globex"]))
        book.revoked_listeners.append(lambda tenant, device: env.notify(tenant, [device]))
        env.verifier = Admission(env.verifier, book)  # type: ignore[assignment]
        await env.publish(1)

        async with running("rest-poll", env) as make:
            client = make(env.identity)
            await client._open()
            try:
                status, _, _ = await client.request("GET", "/api/v1/deployments")
                assert status == 200
                await book.revoke(TENANT, DEVICE)
                status, _, body = await client.request("GET", "/api/v1/deployments")
                assert status == 403 and b"revoked" in body
            finally:
                await client.close()

        async with running("h2-push", env) as make:
            client = make(env.other)  # globex/edge-1, still allowed
            await client.connect()
            try:
                await book.revoke("globex", DEVICE)
                with anyio.fail_after(2.0):
                    await client.closed.wait()  # the push connection was closed
            finally:
                await client.close()
            refused = make(env.other)
            refused.report_capabilities = False
            await refused.connect()
            try:
                with anyio.fail_after(5.0):
                    await refused.closed.wait()
            finally:
                await refused.close()
            assert refused.push_refusal is not None and refused.push_refusal[0] == 403
            assert b"revoked" in refused.push_refusal[1]
    finally:
        await store.close()
