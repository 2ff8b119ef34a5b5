"""Retention on a real SQLite store: telemetry by age and by size per tenant, events and
terminal audits by age, in bounded batches that let telemetry ingest through; the policy from
the controller's configuration; the task's one log line per pass that deleted something."""

from __future__ import annotations

import logging
import sqlite3

import anyio
import pytest

from controller.config import ControllerConfig
from controller.retention import (
    INTERVAL_ENV,
    RetentionPolicy,
    interval_from_env,
    retention_pass,
    run_retention,
)
from controller.store.sqlite import SqliteStore, telemetry_db_path
from controller.store.sqlite_schema import TELEMETRY_MIGRATIONS, migrate
from margo_stream.errors import ConfigError

pytestmark = pytest.mark.anyio

DAY = 86400.0
NOW = 1_000_000_000.0
MIB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "controller.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def policy(**kw) -> RetentionPolicy:
    values = {
        "telemetry_age": 7 * DAY,
        "telemetry_max_bytes": 1 << 30,
        "event_age": 90 * DAY,
        "audit_age": 365 * DAY,
    }
    values.update(kw)
    return RetentionPolicy(**values)


async def connect(store: SqliteStore, tenant: str, device: str) -> None:
    await store.device_connected(
        tenant, device, capabilities={}, reported_labels={}, manifest_version=None, remote="t"
    )


async def telemetry_rows(store: SqliteStore, tenant: str) -> list[tuple[str, int, float, int]]:
    """``(device, seq, received_at, payload length)`` of the tenant's records, oldest first."""

    def read(conn):
        return conn.execute(
            "SELECT device_id, seq, received_at, length(payload) FROM telemetry"
            " WHERE tenant = ? ORDER BY received_at, device_id, seq",
            (tenant,),
        ).fetchall()

    return await store._telemetry._read(read)


async def actual_bytes(store: SqliteStore) -> dict[str, int]:
    def read(conn):
        rows = conn.execute(
            "SELECT tenant, SUM(length(payload)) FROM telemetry GROUP BY tenant"
        ).fetchall()
        return {t: int(n) for t, n in rows}

    return await store._telemetry._read(read)


async def test_age_prunes_telemetry_events_and_ended_audits(store: SqliteStore) -> None:
    for tenant in ("acme", "globex"):
        await connect(store, tenant, "d1")
        old = [(s, "m", b"o" * 100) for s in range(1, 51)]
        new = [(s, "m", b"n" * 100) for s in range(51, 61)]
        await store.ingest_telemetry(tenant, "d1", old, now=NOW - 8 * DAY)
        await store.ingest_telemetry(tenant, "d1", new, now=NOW - 6 * DAY)
    await store.record_gap("acme", "d1", 61, 70, now=NOW - 8 * DAY)  # passed by the watermark
    for age in (100 * DAY, 91 * DAY, 89 * DAY, 1.0):
        await store.add_event("acme", "custom", payload={"age": age}, now=NOW - age)
    ended_old = await store.start_session_audit("acme", "d1", operator="o", now=NOW - 400 * DAY)
    await store.finish_session_audit(ended_old, now=NOW - 399 * DAY)
    ended_late = await store.start_session_audit("acme", "d1", operator="o", now=NOW - 400 * DAY)
    await store.finish_session_audit(ended_late, now=NOW - 300 * DAY)  # long, ended recently
    still_open = await store.start_session_audit("acme", "d1", operator="o", now=NOW - 500 * DAY)
    watermark = await store.telemetry_watermark("acme", "d1")

    report = await retention_pass(store, policy(), now=NOW)

    assert report.telemetry_records == 100 and report.telemetry_bytes == 100 * 100
    for tenant in ("acme", "globex"):
        assert [r[1] for r in await telemetry_rows(store, tenant)] == list(range(51, 61))
    assert await store.telemetry_usage() == {"acme": 1000, "globex": 1000}
    assert await store.telemetry_usage() == await actual_bytes(store)
    assert report.gaps == 1 and await store.telemetry_watermark("acme", "d1") == watermark
    ages = [e.payload.get("age") for e in await store.list_events("acme") if e.kind == "custom"]
    assert ages == [89 * DAY, 1.0]
    # and the terminal.opened/closed events the audits wrote 300 to 500 days back (5 of them);
    # the device and gap events are younger (written at the real time, and 8 days back)
    assert report.events == 2 + 5
    assert {a.id for a in await store.list_session_audits("acme")} == {ended_late, still_open}
    assert report.audits == 1
    again = await retention_pass(store, policy(), now=NOW)
    assert again.deleted == 0


async def test_size_cap_per_tenant_deletes_the_oldest_only(store: SqliteStore) -> None:
    payload = b"x" * 10_000
    for device in ("d1", "d2", "d3"):
        await connect(store, "acme", device)
    await connect(store, "globex", "g1")
    # 300 records of 10 kB for acme (about 2.9 MiB), interleaved across devices in time
    for step in range(100):
        for k, device in enumerate(("d1", "d2", "d3")):
            await store.ingest_telemetry(
                "acme", device, [(step + 1, "m", payload)], now=NOW + step * 3 + k
            )
    await store.ingest_telemetry(
        "globex", "g1", [(s, "m", payload) for s in range(1, 51)], now=NOW
    )  # about 0.5 MiB: under the cap
    globex_before = await telemetry_rows(store, "globex")

    report = await retention_pass(store, policy(telemetry_max_bytes=MIB), now=NOW + 400)

    kept = await telemetry_rows(store, "acme")
    used = sum(r[3] for r in kept)
    assert MIB - 10_000 < used <= MIB  # just under the cap: no more deleted than needed
    assert len(kept) == MIB // 10_000
    deleted = 300 - len(kept)
    assert report.over_cap == {"acme": (deleted, deleted * 10_000)}
    # the oldest went first: what is left is the newest, a contiguous tail in time
    assert min(r[2] for r in kept) == NOW + 300 - len(kept)
    assert await telemetry_rows(store, "globex") == globex_before
    assert await store.telemetry_usage() == await actual_bytes(store)
    assert report.telemetry_records == 0  # nothing was old


async def test_batches_are_bounded(store: SqliteStore) -> None:
    await connect(store, "acme", "d1")
    await store.ingest_telemetry(
        "acme", "d1", [(s, "m", b"p") for s in range(1, 10_501)], now=NOW - 30 * DAY
    )
    assert await store.prune_telemetry_before(NOW, limit=100) == (100, 100)
    report = await retention_pass(store, policy(batch=1000), now=NOW)
    assert report.telemetry_records == 10_400
    assert report.largest_batch == 1000
    assert report.batches >= 11  # 10,400 rows in transactions of at most 1,000
    assert await telemetry_rows(store, "acme") == []


async def test_ingest_runs_between_the_batches_of_a_long_pass(store: SqliteStore) -> None:
    """Deleting a large backlog never holds the telemetry database for the whole pass: an
    ingest submitted while the pass runs is stored after one batch, not after all of them."""
    await connect(store, "acme", "d1")
    await connect(store, "acme", "d2")
    for first in range(1, 60_001, 10_000):
        batch = [(s, "m", b"p" * 50) for s in range(first, first + 10_000)]
        await store.ingest_telemetry("acme", "d1", batch, now=NOW - 30 * DAY)
    done = anyio.Event()
    reports = []

    async def prune() -> None:
        reports.append(await retention_pass(store, policy(batch=1000), now=NOW))
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(prune)
        await anyio.sleep(0)  # the pass submits its first batch
        assert await store.ingest_telemetry("acme", "d2", [(1, "m", b"new")]) == 1
        assert not done.is_set()  # stored while most of the backlog is still there
        left = len(await telemetry_rows(store, "acme"))
        assert left > 30_000
    assert reports[0].telemetry_records == 60_000
    assert [(r[0], r[1]) for r in await telemetry_rows(store, "acme")] == [("d2", 1)]


async def test_usage_is_exact_with_retransmissions(store: SqliteStore) -> None:
    await connect(store, "acme", "d1")
    await store.ingest_telemetry("acme", "d1", [(s, "m", b"ab") for s in range(1, 11)])
    # a retransmission overlapping what is stored, with a duplicate inside the batch
    again = [(s, "m", b"abcd") for s in (8, 9, 10, 11, 11, 12)]
    assert await store.ingest_telemetry("acme", "d1", again) == 12
    assert await store.telemetry_usage() == {"acme": 10 * 2 + 2 * 4}
    assert await store.telemetry_usage() == await actual_bytes(store)
    assert await store.prune_telemetry("acme", NOW * 10) == 12
    assert await store.telemetry_usage() == {"acme": 0}


async def test_telemetry_upgrade_counts_existing_bytes(tmp_path) -> None:
    """A telemetry database of schema 1 (no byte counts yet): the upgrade sums it once."""
    main = tmp_path / "controller.db"
    path = telemetry_db_path(str(main))
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, path, TELEMETRY_MIGRATIONS[:1])
    conn.executemany(
        "INSERT INTO telemetry (tenant, device_id, seq, stream, received_at, payload)"
        " VALUES (?, 'd1', ?, 'm', 1, ?)",
        [("acme", 1, b"abc"), ("acme", 2, b"de"), ("globex", 1, b"x" * 10)],
    )
    conn.close()
    async with SqliteStore(main) as s:
        assert await s.telemetry_usage() == {"acme": 5, "globex": 10}


def test_policy_from_the_configuration(tmp_path, monkeypatch) -> None:
    config = ControllerConfig(certs=tmp_path, data=tmp_path)
    assert RetentionPolicy.from_config(config) == RetentionPolicy(
        telemetry_age=7 * DAY, telemetry_max_bytes=1 << 30, event_age=90 * DAY, audit_age=365 * DAY
    )
    with pytest.raises(ValueError, match="batch"):
        policy(batch=0)
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert interval_from_env() == 60.0
    monkeypatch.setenv(INTERVAL_ENV, "500ms")
    assert interval_from_env() == 0.5
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(ConfigError, match=INTERVAL_ENV):
        interval_from_env()


async def test_the_task_logs_one_line_per_pass_that_deleted(store: SqliteStore, caplog) -> None:
    await connect(store, "acme", "d1")
    await store.ingest_telemetry(
        "acme", "d1", [(s, "m", b"p" * 10) for s in range(1, 31)], now=NOW - 30 * DAY
    )
    caplog.set_level(logging.INFO, logger="margo.controller.retention")
    with anyio.move_on_after(0.5):
        await run_retention(store, policy(), interval=0.05, first_delay=0, clock=lambda: NOW)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "retention-pruned"]
    assert len(lines) == 1  # the later passes found nothing to delete and said nothing
    assert lines[0].telemetry_records == 30 and lines[0].telemetry_bytes == 300
    assert "30 telemetry records" in lines[0].getMessage()
