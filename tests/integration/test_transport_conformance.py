"""The same conformance test over every alternative transport (rest-poll, h2-push, mqtt).

Each run: a real SqliteStore, a real PKI, the real server on loopback. A signed manifest with
the heartbeat deployment is delivered and verified (signature, tenant/device, digests); an
``installed`` status lands in the store; a changed manifest and then an empty one (delete)
reach the client (push transports without polling, rest-poll at a short interval); another
tenant's device with the same device id cannot read this device's desired state.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from bench.transports.base import DesiredUpdate, TransportClient, capabilities_document
from controller.device_api.h2_push import serve_h2_push
from controller.device_api.rest_poll import serve_rest_poll
from controller.device_api.tls import tenant_bundle_paths
from controller.store.sqlite import SqliteStore
from margo_stream.identity.pki import (
    CLOCK_SKEW,
    cert_to_pem,
    init_pki,
    issue_device,
    key_to_pem,
    load_tenant_ca,
    make_leaf,
)
from margo_stream.identity.trust import load_signing_key, load_signing_pub
from margo_stream.identity.verify import PeerVerifier
from margo_stream.state.digest import sha256_digest
from margo_stream.state.documents import parse_deployment
from margo_stream.state.manifest import (
    MARGO_MEDIA_TYPE,
    MEDIA_TYPE,
    ManifestEntry,
    build_manifest,
    sign,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(60)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "process-heartbeat.yaml"
TENANT, DEVICE = "acme", "edge-1"
WAIT = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Env:
    def __init__(self, root: Path, store: SqliteStore) -> None:
        self.root = root
        self.certs = root / "certs"
        init_pki(self.certs, ["acme", "globex"], ["localhost", "127.0.0.1"])
        self.identity = issue_device(self.certs, TENANT, DEVICE)
        self.other = issue_device(self.certs, "globex", DEVICE)  # same id, other tenant
        self.store = store
        self.verifier = PeerVerifier.from_dir(self.certs)
        self.key = load_signing_key(self.certs, TENANT)
        self.pub = load_signing_pub(self.certs / TENANT / "signing.pub")
        self.server_cert = self.certs / "controller" / "cert.pem"
        self.server_key = self.certs / "controller" / "key.pem"
        self.bundles = tenant_bundle_paths(self.certs)
        self.notify: Callable[[str, list[str]], None] = lambda tenant, ids: None

    async def publish(self, version: int, site: str | None = "SID-1") -> str | None:
        """Store deployment + signed manifest v``version``; returns the document digest."""
        entries = []
        digest = None
        if site is not None:
            doc = EXAMPLE.read_bytes().replace(b"SID-123-ABC", site.encode())
            dep = parse_deployment(doc)
            rec = await self.store.put_deployment(
                TENANT, dep.deployment_id, document=doc, name=dep.name, profile=dep.profile.value
            )
            digest = rec.digest
            assert digest == sha256_digest(doc)
            entries.append(ManifestEntry(deployment_id=dep.deployment_id, digest=digest))
        now = dt.datetime.now(dt.UTC)
        data = build_manifest(
            TENANT, DEVICE, version, entries, issued_at=now, expires=now + dt.timedelta(days=1)
        )
        await self.store.put_manifest(TENANT, DEVICE, version, data, sign(data, self.key))
        self.notify(TENANT, [DEVICE])
        return digest


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = SqliteStore(tmp_path / "controller.db")
    await store.open()
    try:
        e = Env(tmp_path, store)
        await store.device_connected(
            TENANT,
            DEVICE,
            capabilities={},
            reported_labels={},
            manifest_version=None,
            remote="test",
        )
        yield e
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def running(kind: str, env: Env) -> AsyncIterator[Callable[..., TransportClient]]:
    """Start the server for ``kind``; yield a factory ``make(identity_dir) -> client``."""
    async with anyio.create_task_group() as tg:
        if kind == "rest-poll":
            from bench.transports.rest_client import RestPollClient

            server = await tg.start(
                serve_rest_poll,
                env.store,
                env.verifier,
                "127.0.0.1",
                0,
                env.server_cert,
                env.server_key,
                env.bundles,
            )
            env.notify = server.notify

            def make(identity: Path) -> TransportClient:
                return RestPollClient(identity, "127.0.0.1", server.port, interval=0.1)

            yield make
        elif kind == "h2-push":
            from bench.transports.h2_client import H2PushClient

            server = await tg.start(
                serve_h2_push,
                env.store,
                env.verifier,
                "127.0.0.1",
                0,
                env.server_cert,
                env.server_key,
                env.bundles,
            )
            env.notify = server.notify

            def make(identity: Path) -> TransportClient:
                return H2PushClient(identity, "127.0.0.1", server.port)

            yield make
        else:
            from bench.transports.mqtt import (
                MosquittoBroker,
                MqttBridge,
                MqttClient,
                mosquitto_path,
            )

            if mosquitto_path() is None:
                pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
            async with MosquittoBroker(env.certs, env.root / "mqtt", ["acme", "globex"]) as broker:
                bridge = await tg.start(MqttBridge(env.store, broker, ["acme", "globex"]).run)
                env.notify = bridge.notify

                def make(identity: Path) -> TransportClient:
                    tenant = identity.parent.parent.name
                    return MqttClient(identity, "127.0.0.1", broker.ports[tenant])

                yield make
                tg.cancel_scope.cancel()
        tg.cancel_scope.cancel()


async def _next(client: TransportClient) -> DesiredUpdate:
    with anyio.fail_after(WAIT):
        return await client.next_desired()


async def _wait_status(env: Env, state: str) -> None:
    with anyio.fail_after(WAIT):
        while True:
            got = await env.store.list_statuses(TENANT, DEVICE)
            if got and got[0].status["status"]["state"] == state:
                return
            await anyio.sleep(0.02)  # the store offers no status feed to wait on


@pytest.mark.parametrize("kind", ["rest-poll", "h2-push", "mqtt"])
async def test_conformance(kind: str, env: Env) -> None:
    digest1 = await env.publish(1)
    async with running(kind, env) as make:
        client = make(env.identity)
        await client.connect()
        try:
            first = await _next(client)
            manifest = first.verify(env.pub, TENANT, DEVICE)
            assert first.version == 1 and manifest.deployments[0].digest == digest1
            assert sha256_digest(first.blobs[digest1]) == digest1
            dep_id = manifest.deployments[0].deployment_id
            comps = [{"name": "heartbeat", "state": "installed"}]
            await client.post_status(dep_id, 1, "installed", comps)
            await _wait_status(env, "installed")
            statuses = await env.store.list_statuses(TENANT, DEVICE)
            assert statuses[0].status["adoptedManifestVersion"] == 1
            assert statuses[0].status["deviceId"] == DEVICE

            digest2 = await env.publish(2, site="SID-2")
            second = await _next(client)
            m2 = second.verify(env.pub, TENANT, DEVICE)
            assert second.version == 2 and m2.deployments[0].digest == digest2 != digest1
            assert b"SID-2" in second.blobs[digest2]
            assert digest1 not in second.blobs or kind == "mqtt"  # only missing blobs pushed

            await env.publish(3, site=None)
            third = await _next(client)
            assert third.verify(env.pub, TENANT, DEVICE).deployments == ()

            if hasattr(client, "sample"):
                client.sample()
            counters = client.counters
            assert counters.updates == 3 and counters.requests >= 2
            assert counters.bytes_received > sum(
                len(u.manifest_bytes) for u in (first, second, third)
            )
            assert counters.bytes_sent > 0

            await _other_tenant_cannot_read(kind, env, make)
        finally:
            await client.close()


async def _other_tenant_cannot_read(kind: str, env: Env, make: Callable[..., Any]) -> None:
    """globex/edge-1 has the same device id; it must never see acme/edge-1's state."""
    other = make(env.other)
    if kind == "rest-poll":
        await other.connect()
        try:
            status, _, body = await other.request("GET", "/api/v1/deployments")
            assert status == 404, body  # globex/edge-1 has no desired state; acme's is not served
            status, _, _ = await other.request("GET", "/api/v1/clients/other-device/deployments")
            assert status == 403
        finally:
            await other.close()
    elif kind == "h2-push":
        await other.connect()
        try:
            status, body = await other.request("GET", "/api/v1/deployments")
            assert status == 404, body
        finally:
            await other.close()
    else:
        await other.connect()
        try:
            # Mosquitto grants a subscription its ACL denies and then delivers nothing, so prove
            # the denial by order: retained messages are sent as each SUBSCRIBE is processed, so
            # if acme's retained desired state were readable it would arrive before our own
            # retained presence message, subscribed to second.
            own = f"margo/globex/{DEVICE}/online"
            await other.subscribe(f"margo/{TENANT}/{DEVICE}/desired")
            await other.subscribe(f"margo/+/{DEVICE}/desired")
            await other.subscribe(own)
            with anyio.fail_after(WAIT):
                name, payload = await other.paho.recv.receive()
            assert (name, payload) == (own, b"1")
        finally:
            await other.close()
        # and globex's certificate does not even pass the TLS handshake on acme's listener
        from bench.transports.mqtt import MqttClient

        wrong = MqttClient(env.other, "127.0.0.1", make(env.identity).port)
        with pytest.raises((ConnectionError, OSError, TimeoutError)):
            await wrong.connect()
        await wrong.close()


def _forged_identity(env: Env) -> Path:
    """A leaf signed by globex's CA that claims spiffe://acme/margo/client/edge-1."""
    ca, ca_key = load_tenant_ca(env.certs, "globex")
    now = dt.datetime.now(dt.UTC)
    leaf, key = make_leaf(
        ca,
        ca_key,
        uris=[f"spiffe://{TENANT}/margo/client/{DEVICE}"],
        not_before=now - CLOCK_SKEW,
        not_after=now + dt.timedelta(days=1),
        eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        common_name=DEVICE,
    )
    d = env.root / "forged"
    d.mkdir()
    (d / "cert.pem").write_bytes(cert_to_pem(leaf))
    (d / "key.pem").write_bytes(key_to_pem(key))
    (d / "ca.pem").write_bytes((env.certs / TENANT / "ca.pem").read_bytes())
    (d / "signing.pub").write_bytes((env.certs / TENANT / "signing.pub").read_bytes())
    (d / "root.pub").write_bytes((env.certs / TENANT / "root.pub").read_bytes())
    return d


@pytest.mark.parametrize("kind", ["rest-poll", "h2-push"])
async def test_cross_tenant_forgery_refused(kind: str, env: Env) -> None:
    """OpenSSL's union-of-bundles check lets the forged leaf through; PeerVerifier must not."""
    await env.publish(1)
    async with running(kind, env) as make:
        client = make(_forged_identity(env))
        if kind == "rest-poll":
            await client._open()
            try:
                status, hdrs, body = await client.request("GET", "/api/v1/deployments")
            finally:
                await client.close()
            assert hdrs[b"content-type"] == b"application/problem+json"
        else:
            client.report_capabilities = False
            await client.connect()
            try:
                with anyio.fail_after(WAIT):
                    await client.closed.wait()  # the push stream was refused
            finally:
                await client.close()
            assert client.push_refusal is not None
            status, body = client.push_refusal
        assert status == 403
        problem = json.loads(body)
        assert problem["status"] == 403 and "acme" in problem["detail"]


async def test_rest_poll_http_semantics(env: Env) -> None:
    digest = await env.publish(1)
    async with running("rest-poll", env) as make:
        client = make(env.identity)
        await client.connect()
        try:
            status, hdrs, body = await client.request("GET", "/api/v1/deployments")
            assert status == 200 and hdrs[b"content-type"] == MARGO_MEDIA_TYPE.encode()
            assert hdrs[b"etag"] == f'"{sha256_digest(body)}"'.encode()
            assert hdrs[b"cache-control"] == b"private"
            doc = json.loads(body)
            assert set(doc) == {"manifestVersion", "bundle", "deployments"}
            assert doc["bundle"]["url"] == f"/api/v1/bundles/{doc['bundle']['digest']}"
            assert doc["deployments"][0]["digest"] == digest  # bundles: test_margo_conformance
            url = doc["deployments"][0]["url"]
            status, _, _ = await client.request(
                "GET", "/api/v1/deployments", {"if-none-match": hdrs[b"etag"].decode()}
            )
            assert status == 304
            status, _, problem = await client.request(
                "GET", "/api/v1/deployments", {"accept": "text/html"}
            )
            assert status == 406 and json.loads(problem)["status"] == 406
            status, shdrs, signed = await client.request(
                "GET", "/api/v1/deployments", {"accept": MEDIA_TYPE}
            )
            assert status == 200 and b"x-margo-stream-signature" in shdrs
            DesiredUpdate(1, signed, base64.b64decode(shdrs[b"x-margo-stream-signature"])).verify(
                env.pub, TENANT, DEVICE
            )
            status, yhdrs, yaml_bytes = await client.request("GET", url)
            assert status == 200 and sha256_digest(yaml_bytes) == digest
            assert yhdrs[b"content-type"] == b"application/yaml"
            assert b"immutable" in yhdrs[b"cache-control"]
            status, _, _ = await client.request("GET", f"/api/v1/deployments/other/{digest}")
            assert status == 404
            bad = {
                "deploymentId": "heartbeat-0001",
                "adoptedManifestVersion": 1,
                "status": {"state": "sleeping"},
                "components": [],
            }
            status, _, problem = await client.request(
                "POST", "/api/v1/deployments/heartbeat-0001/status", {}, json.dumps(bad).encode()
            )
            assert status == 422 and "status.state" in json.loads(problem)["detail"]
            status, _, _ = await client.request(
                "PUT",
                "/api/v1/capabilities/someone-else",
                {},
                json.dumps({"properties": {"id": "someone-else"}}).encode(),
            )
            assert status == 403
            status, _, _ = await client.request("DELETE", "/api/v1/deployments")
            assert status == 405
            record = await env.store.get_device(TENANT, DEVICE)
            assert record.capabilities["vendor"] == "margo-stream"
            # a device's capabilities labels are its claim: never the operator's labels
            await env.store.set_labels(TENANT, DEVICE, {"line": "2"})
            doc = {**capabilities_document(DEVICE), "labels": {"line": "1"}}
            assert await client.put_capabilities(doc) == 200
            record = await env.store.get_device(TENANT, DEVICE)
            assert record.labels == {"line": "2"} and record.reported_labels == {"line": "1"}
        finally:
            await client.close()
