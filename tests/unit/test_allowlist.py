"""The allow-list: its store table and import rules, the in-memory check, the allow files
``margo-certs device`` writes, admission (chain, then the allow-list), revocation and the
operator API's revoke / allow / reload routes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from controller.allowlist import NOT_ALLOWED, REVOKED, AllowList
from controller.api.app import create_app
from controller.identities import Admission, IdentityBook, MustEnrolAgain
from controller.registry import SessionRegistry, SessionView
from controller.store.base import IdentityRecord
from controller.store.sqlite import SqliteStore
from margo_stream.errors import ConfigError, IdentityError, NotFound, PeerRejected
from margo_stream.identity.allowed_files import (
    allowed_path,
    read_allowed,
    read_allowed_dir,
    spki_sha256,
)
from margo_stream.identity.operator_files import OperatorTable
from margo_stream.identity.pki import init_pki, issue_device
from margo_stream.identity.verify import PeerVerifier
from margo_stream.protocol.codes import ErrorCode

pytestmark = pytest.mark.anyio

K1, K2, K3 = "1" * 64, "2" * 64, "3" * 64
ACME = "acme-token-0123456789"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "c.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki") / "certs"
    init_pki(d, ["acme", "globex"], ["localhost"])
    return d


def leaf_of(ddir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((ddir / "cert.pem").read_bytes())


# --- the store ---------------------------------------------------------------------------------


async def test_store_allow_revoke_list(store) -> None:
    with pytest.raises(NotFound):
        await store.revoke_identity("acme", "d1")
    with pytest.raises(NotFound):
        await store.get_identity("acme", "d1")
    with pytest.raises(ValueError):
        await store.allow_identity("acme", "d1", "not-hex", 5.0)
    await store.allow_identity("acme", "d1", K1, 5000.0, now=10.0)
    await store.allow_identity("globex", "d1", K2, 6000.0, now=11.0)
    await store.revoke_identity("acme", "d1", now=12.0)
    assert await store.get_identity("acme", "d1") == IdentityRecord(
        "acme", "d1", K1, "revoked", 5000.0, 12.0
    )
    assert [(r.tenant, r.state) for r in await store.list_identities()] == [
        ("acme", "revoked"),
        ("globex", "allowed"),
    ]
    await store.allow_identity("acme", "d1", K3, 7000.0, now=13.0)  # a new enrolment
    rec = await store.get_identity("acme", "d1")
    assert (rec.state, rec.key_sha256, rec.not_after) == ("allowed", K3, 7000.0)
    kinds = [e.kind for e in await store.list_events("acme")]
    assert kinds == ["device.allowed", "device.revoked", "device.allowed"]


async def test_store_import_rules(store) -> None:
    # unknown: allowed; the same file again changes nothing
    assert len(await store.import_identities([("acme", "d1", K1, 100.0, 1.0)], now=10.0)) == 1
    assert await store.import_identities([("acme", "d1", K1, 100.0, 1.0)], now=20.0) == []
    # revoked, then its old file re-imported: stays revoked
    await store.revoke_identity("acme", "d1", now=30.0)
    assert await store.import_identities([("acme", "d1", K1, 100.0, 1.0)], now=40.0) == []
    assert await store.import_identities([("acme", "d1", K1, 100.0, None)], now=40.0) == []
    assert (await store.get_identity("acme", "d1")).state == "revoked"
    # a file issued after the revocation with a new key allows it again
    changed = await store.import_identities([("acme", "d1", K2, 200.0, 35.0)], now=50.0)
    assert [(r.state, r.key_sha256) for r in changed] == [("allowed", K2)]
    # an enrolment (newer than the file) is not undone by the older file
    await store.allow_identity("acme", "d1", K3, 300.0, now=60.0)
    assert await store.import_identities([("acme", "d1", K2, 200.0, 35.0)], now=70.0) == []
    assert (await store.get_identity("acme", "d1")).key_sha256 == K3
    # a file without "issued" counts as newer only with another key
    changed = await store.import_identities([("acme", "d1", K1, 400.0, None)], now=80.0)
    assert [(r.key_sha256, r.not_after) for r in changed] == [(K1, 400.0)]


# --- the in-memory allow-list ------------------------------------------------------------------


def test_allowlist_check() -> None:
    allow = AllowList(
        [
            IdentityRecord("acme", "d1", K1, "allowed", 1.0, 1.0),
            IdentityRecord("acme", "d2", K2, "revoked", 1.0, 1.0),
        ]
    )
    assert allow.check("acme", "d1", K1) is None
    assert allow.check("acme", "d1", K2) == NOT_ALLOWED
    assert allow.check("acme", "d1", "") == NOT_ALLOWED
    assert allow.check("globex", "d1", K1) == NOT_ALLOWED
    assert allow.check("acme", "d2", K2) == REVOKED
    assert allow.check("acme", "d3", K1) == NOT_ALLOWED
    assert (allow.state("acme", "d2"), allow.state("acme", "d3")) == ("revoked", "unknown")


# --- allow files -------------------------------------------------------------------------------


def test_margo_certs_device_writes_the_allow_file(pki) -> None:
    ddir = issue_device(pki, "acme", "press-01")
    leaf = leaf_of(ddir)
    found = read_allowed(allowed_path(pki, "acme", "press-01"), "acme")
    assert found.key_sha256 == spki_sha256(leaf) == spki_sha256(leaf.public_key())
    assert found.not_after == int(leaf.not_valid_after_utc.timestamp())
    assert found.issued is not None
    identity = PeerVerifier.from_dir(pki).verify(leaf)
    assert identity.key_sha256 == found.key_sha256  # what the verifier pins
    assert [f.device_id for f in read_allowed_dir(pki, ["acme", "globex"])] == ["press-01"]


@pytest.mark.parametrize(
    ("name", "body", "why"),
    [
        ("d1.json", "{nope", "not JSON"),
        ("d1.json", '{"device": "d2", "key_sha256": "' + K1 + '", "not_after": 1}', "name"),
        ("d1.json", '{"device": "d1", "key_sha256": "ABC", "not_after": 1}', "hex"),
        ("d1.json", '{"device": "d1", "key_sha256": "' + K1 + '", "not_after": "x"}', "unix"),
        ("d1.json", "[]", "object"),
    ],
)
def test_bad_allow_files_are_refused(tmp_path, name, body, why) -> None:
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(IdentityError, match=why):
        read_allowed(path, "acme")


# --- admission and revocation ------------------------------------------------------------------


class FakeLink:
    def __init__(self, tenant: str, device_id: str) -> None:
        self.tenant, self.device_id = tenant, device_id
        self.closed: tuple[int, str] | None = None
        self.conn = self  # registry.link checks conn.closed

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def test_admission_and_revocation(pki, store) -> None:
    registry = SessionRegistry()
    book = IdentityBook(store, registry, pki)
    ddir = issue_device(pki, "acme", "adm-01")
    await book.load(read_allowed_dir(pki, ["acme"]))
    admission = Admission(PeerVerifier.from_dir(pki), book)
    assert admission.verify(leaf_of(ddir)).device_id == "adm-01"
    # a device issued after the load is admitted from its own file
    later = issue_device(pki, "acme", "adm-02")
    assert admission.verify(leaf_of(later)).device_id == "adm-02"
    # an identity on no list is refused, with the reason first
    ghost = issue_device(pki, "acme", "adm-03")
    allowed_path(pki, "acme", "adm-03").unlink()
    with pytest.raises(PeerRejected, match=r"^not-allowed: .*allow-list"):
        admission.verify(leaf_of(ghost))
    # revoke: the live session is closed, later handshakes refused
    link = FakeLink("acme", "adm-01")
    registry.register(SessionView("acme", "adm-01", "r", 0.0, 0.0, handle=link))  # type: ignore[arg-type]
    rec = await book.revoke("acme", "adm-01")
    assert rec.state == "revoked" and link.closed == (ErrorCode.IDENTITY_REFUSED, "revoked")
    with pytest.raises(PeerRejected, match=r"^revoked: "):
        admission.verify(leaf_of(ddir))
    with pytest.raises(MustEnrolAgain):
        await book.allow_again("acme", "adm-01")
    late = FakeLink("acme", "adm-01")
    await book.recheck(late)  # type: ignore[arg-type]
    assert late.closed == (ErrorCode.IDENTITY_REFUSED, "revoked")
    # a fresh book (a restart) loads the revocation from the store
    again = IdentityBook(store, SessionRegistry(), pki)
    await again.load(read_allowed_dir(pki, ["acme"]))
    assert again.allowlist.state("acme", "adm-01") == "revoked"
    assert again.allowlist.state("acme", "adm-02") == "allowed"


async def test_api_revoke_allow_reload_and_device_state(pki, store) -> None:
    registry = SessionRegistry()
    book = IdentityBook(store, registry, pki)
    issue_device(pki, "acme", "api-01")
    issue_device(pki, "acme", "api-02")
    await book.load(read_allowed_dir(pki, ["acme"]))
    for device in ("api-01", "api-02"):
        await store.device_connected(
            "acme", device, capabilities={}, reported_labels={}, manifest_version=None, remote="r"
        )
    reloads: list[str] = []

    async def reload() -> dict[str, object]:
        reloads.append("x")
        if len(reloads) > 1:
            raise ConfigError("reload failed, nothing changed: DIR/acme/ca.pem: not PEM")
        return {"tenants": ["acme"]}

    app = create_app(
        store=store,
        registry=registry,
        operators=OperatorTable.admins({ACME: "acme"}),
        identities=book,
        reload=reload,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        client.headers["Authorization"] = f"Bearer {ACME}"
        d = (await client.get("/api/v1/devices/api-01")).json()
        assert d["state"] == "allowed" and d["not_after"].endswith("Z")
        r = await client.post("/api/v1/devices/api-01/revoke")
        assert r.status_code == 200 and r.json()["state"] == "revoked"
        r = await client.post("/api/v1/devices/api-01/allow")
        assert r.status_code == 409 and "enrol again" in r.json()["detail"]
        assert r.json()["type"] == "urn:margo-stream:problem:revoked-identity"
        r = await client.post("/api/v1/devices/api-02/allow")
        assert r.status_code == 200 and r.json()["state"] == "allowed"
        r = await client.post("/api/v1/devices/nobody/revoke")
        assert r.status_code == 404
        items = (await client.get("/api/v1/devices")).json()["items"]
        assert {i["id"]: i["state"] for i in items} == {"api-01": "revoked", "api-02": "allowed"}
        assert (await client.post("/api/v1/admin/reload")).json() == {"tenants": ["acme"]}
        r = await client.post("/api/v1/admin/reload")
        assert r.status_code == 422 and "not PEM" in r.json()["detail"]
    assert json.loads(allowed_path(pki, "acme", "api-01").read_text())["device"] == "api-01"


@pytest.mark.parametrize("stack", ["qh3", "aioquic"])
def test_simulated_bench_devices_are_allowed(pki, stack) -> None:
    """margo-bench's simulated devices mint their certificates in the worker: each gets an
    allow file the controller's reload imports, and presents that certificate on either QUIC
    stack."""
    from bench.simfleet import Fleet, device_id

    issue_device(pki, "acme", "bench-template")
    fleet = Fleet(
        {
            "mode": "margo",
            "host": "127.0.0.1",
            "port": 1,
            "first": 7,
            "count": 3,
            "certs": str(pki),
            "tenant": "acme",
            "template": str(pki / "acme" / "devices" / "bench-template"),
            "server_name": "acme",
            "idle_timeout": 10.0,
            "quic_stack": stack,
        }
    )
    fleet.prepare()
    files = {f.device_id: f for f in read_allowed_dir(pki, ["acme"])}
    for slot, index in enumerate(range(7, 10)):
        presented = fleet.configs[slot].certificate
        assert presented is not None
        # qh3's certificate object gives its DER; aioquic's is cryptography's
        cert = (
            x509.load_der_x509_certificate(presented.public_bytes())
            if stack == "qh3"
            else presented
        )
        assert files[device_id(index)].key_sha256 == spki_sha256(cert)
