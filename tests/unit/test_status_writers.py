"""The controller's status write path (``controller.status.status_writer``) on the real stores:
on PostgreSQL (a private server, tests/pg_server.py) several ``put_status_batch`` calls really
run at once, never two with the same device, and every device's statuses are stored and turned
into events in the order they were submitted; on SQLite one call runs at a time."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from controller.status import status_writer
from controller.store.pg import PgStore
from controller.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio
TENANT = "t"
DEVICES = [f"dev-{i:02d}" for i in range(40)]
STATUSES = 8  # per device
STATES = ("installing", "installed")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Overlap:
    """Counts ``put_status_batch`` calls in flight (the most at once) and checks that no two
    calls in flight share a device."""

    def __init__(self) -> None:
        self.in_flight: list[set[str]] = []
        self.most = 0
        self.calls = 0

    async def around(self, items: Sequence[tuple[str, str, Any, int]], call: Any) -> Any:
        devices = {d for _, d, _, _ in items}
        for other in self.in_flight:
            assert devices.isdisjoint(other), f"two batches at once write {devices & other}"
        self.in_flight.append(devices)
        self.most = max(self.most, len(self.in_flight))
        self.calls += 1
        try:
            return await call
        finally:
            self.in_flight.remove(devices)


class Counting:
    """Mixed in before a store: its ``put_status_batch`` goes through an ``Overlap``."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.overlap = Overlap()

    async def put_status_batch(self, items, *, now=None):
        return await self.overlap.around(items, super().put_status_batch(items, now=now))  # type: ignore[misc]


class CountingPg(Counting, PgStore):
    pass


class CountingSqlite(Counting, SqliteStore):
    pass


def status(seq: int) -> dict[str, Any]:
    state = STATES[seq % 2]
    return {
        "deploymentId": "app",
        "adoptedManifestVersion": 1,
        "status": {"state": state},
        "components": [{"name": "c", "state": state}],
    }


async def report_all(store: PgStore | SqliteStore) -> dict[tuple[str, int], object]:
    """Every device reports ``STATUSES`` statuses, all submitted at once in each device's
    order (as a status stream's messages spawn their writes); the result of each."""
    manifest = json.dumps({"manifestVersion": 1, "deployments": [{"deploymentId": "app"}]})
    for d in DEVICES:
        await store.device_connected(
            TENANT, d, capabilities={}, reported_labels={}, manifest_version=1, remote="t"
        )
    await store.put_manifests(TENANT, [(d, 1, manifest.encode(), b"sig") for d in DEVICES])
    writer = status_writer(store)
    assert writer.partitions == store.write_concurrency
    results: dict[tuple[str, int], object] = {}

    async def one(d: str, seq: int) -> None:
        results[(d, seq)] = await writer.submit((TENANT, d, status(seq), seq))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for seq in range(1, STATUSES + 1):
                for d in DEVICES:
                    tg.start_soon(one, d, seq)
    return results


async def check_stored_in_order(store: PgStore | SqliteStore) -> None:
    stored = await store.list_statuses(TENANT)
    assert sorted((s.device_id, s.seq) for s in stored) == [(d, STATUSES) for d in DEVICES]
    events = [e for e in await store.list_events(TENANT, 0, 10_000) if e.device_id in DEVICES]
    for d in DEVICES:  # one event per status (the state alternates), in the device's order
        mine = [e.payload for e in events if e.device_id == d and e.kind == "deployment.status"]
        assert [p["state"] for p in mine] == [STATES[s % 2] for s in range(1, STATUSES + 1)]
        assert [p["previous"] for p in mine[1:]] == [p["state"] for p in mine[:-1]]


async def test_postgresql_writes_status_batches_at_once_and_each_device_in_order(
    pg_dsn: str,
) -> None:
    store = CountingPg(pg_dsn)
    async with store:
        assert store.write_concurrency >= 2
        results = await report_all(store)
        # a device's later status written before an earlier one would make that one False
        assert results == {(d, s): True for d in DEVICES for s in range(1, STATUSES + 1)}
        assert store.overlap.most == store.write_concurrency  # batches really overlapped
        assert store.overlap.calls < len(results)  # and were batches, not one call each
        await check_stored_in_order(store)


async def test_sqlite_writes_one_status_batch_at_a_time(tmp_path: Path) -> None:
    store = CountingSqlite(tmp_path / "controller.db")
    async with store:
        assert store.write_concurrency == 1
        results = await report_all(store)
        assert results == {(d, s): True for d in DEVICES for s in range(1, STATUSES + 1)}
        assert store.overlap.most == 1
        await check_stored_in_order(store)
