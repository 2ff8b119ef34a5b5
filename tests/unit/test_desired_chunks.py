"""A fleet-wide change is stored and pushed chunk by chunk: each chunk's manifests are in the
store before its devices are pushed to, and a race with another controller mid-change
rebuilds only what was not stored yet."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from controller.desired import DesiredConfig, DesiredState, chunks
from controller.document_cache import DocumentCache
from controller.ports import DesiredChangeFanout
from controller.registry import SessionRegistry
from controller.root_chains import RootChains
from controller.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio
EXAMPLE = Path(__file__).parents[2] / "examples" / "process-heartbeat.yaml"
DEVICES = [f"dev-{n:03d}" for n in range(100)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RacedStore(SqliteStore):
    """The real store; when ``race`` is set, another controller stores a manifest for that
    device just before our next write of manifests (which then conflicts)."""

    race: str | None = None
    writes = 0

    async def put_manifests(self, tenant, items, *, now=None) -> None:
        self.writes += 1
        if self.race is not None and self.race in {item[0] for item in items}:
            raced, self.race = self.race, None
            await super().put_manifests(tenant, [(raced, 7, b"theirs", b"sig")], now=now)
        await super().put_manifests(tenant, items, now=now)


@pytest.fixture
async def desired(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "certs" / "acme").mkdir(parents=True)
    (tmp_path / "certs" / "acme" / "signing.key").write_bytes(key)
    store = RacedStore(tmp_path / "controller.db")
    await store.open()
    for device_id in DEVICES:
        await store.device_connected(
            "acme",
            device_id,
            capabilities={},
            reported_labels=None,
            manifest_version=None,
            remote="test",
        )
    record = await store.put_deployment(
        "acme", "heartbeat-0001", document=EXAMPLE.read_bytes(), name="heartbeat", profile="process"
    )
    await store.assign("acme", DEVICES, "heartbeat-0001", record.digest)
    config = DesiredConfig(certs=tmp_path / "certs", manifest_lifetime_days=30.0, push_window=512)

    class NoTasks:
        def spawn(self, fn, *args) -> None:
            raise AssertionError("building manifests spawns nothing")

    try:
        yield DesiredState(
            config, store, SessionRegistry(), NoTasks(), DocumentCache(), RootChains(tmp_path)
        )
    finally:
        await store.close()


def stored_versions(desired: DesiredState) -> dict[str, int]:
    """What the database file holds now, read apart from the store's own connections."""
    with sqlite3.connect(desired.store.path) as db:
        rows = db.execute(
            "SELECT device_id, MAX(version) FROM manifests WHERE tenant = 'acme' GROUP BY device_id"
        ).fetchall()
    return dict(rows)


def test_chunks_grow_to_their_limit() -> None:
    ids = [str(n) for n in range(2000)]
    assert [len(c) for c in chunks(ids)] == [32, 64, 128, 256, 512, 512, 496]
    assert [i for c in chunks(ids) for i in c] == ids
    assert list(chunks([])) == []


async def test_each_chunk_is_stored_before_its_devices_hear_of_it(desired) -> None:
    heard: list[list[str]] = []

    def on_stored(ids: list[str]) -> None:
        versions = stored_versions(desired)
        assert all(versions.get(d) == 1 for d in ids)  # durable before any push
        assert all(d not in versions for d in DEVICES[len(sum(heard, [])) + len(ids) :])
        heard.append(ids)

    got = await desired.rebuild_many("acme", DEVICES, only_if_changed=True, on_stored=on_stored)
    assert got == DEVICES
    assert [len(ids) for ids in heard] == [32, 64, 4]
    assert desired.store.writes == 3
    # the same change again: nothing new to store, nobody to tell
    assert (
        await desired.rebuild_many("acme", DEVICES, only_if_changed=True, on_stored=on_stored) == []
    )
    assert [len(ids) for ids in heard] == [32, 64, 4]


async def test_a_race_mid_change_rebuilds_only_what_was_not_stored(desired) -> None:
    desired.store.race = DEVICES[50]  # in the second chunk
    heard: list[str] = []
    got = await desired.rebuild_many("acme", DEVICES, on_stored=heard.extend)
    assert sorted(got) == DEVICES and sorted(heard) == DEVICES and len(heard) == 100
    versions = stored_versions(desired)
    assert versions[DEVICES[50]] == 8  # built on top of the other controller's version 7
    assert {versions[d] for d in DEVICES if d != DEVICES[50]} == {1}  # the first chunk: once


async def test_every_transport_hears_of_each_chunk_once_it_is_stored(desired) -> None:
    """The HTTP/2 push and the other device transports are told chunk by chunk too, after
    the store has it; devices left as they were are told at the end, as before."""
    heard: list[list[str]] = []

    class Recorder:
        def notify(self, tenant: str, device_ids: list[str]) -> None:
            assert all(stored_versions(desired).get(d) for d in device_ids)
            heard.append(list(device_ids))

    fanout = DesiredChangeFanout(desired)
    fanout.add(Recorder())
    await fanout.desired_changed("acme", DEVICES)
    assert [len(ids) for ids in heard] == [32, 64, 4] and sum(heard, []) == DEVICES
    heard.clear()
    await fanout.desired_changed("acme", DEVICES)  # nothing changed: one word, at the end
    assert heard == [DEVICES]
