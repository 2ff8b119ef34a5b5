"""Retention in a running controller: started with one-minute retention and a 1 MiB cap per
tenant (the smallest the configuration allows) and ``MARGO_RETENTION_INTERVAL=0.5s``, it
deletes the telemetry, events and terminal audits backdated past their retention soon after
start, and then keeps a device that streams 2 MiB of telemetry under the cap by deleting the
oldest records, leaving the other tenant's telemetry alone."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from controller.retention import INTERVAL_ENV
from controller.store.sqlite import SqliteStore
from margo_stream.protocol import messages as m
from margo_stream.protocol.telemetry_codec import encode_batch
from tests.harness import Controller, wait_for
from tests.integration.rawclient import configuration, open_connection, say_hello

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(90)]

MIB = 1 << 20
RECORD = 10_000  # bytes of one telemetry payload
HOUR = 3600.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def query(path: Path, sql: str, *args: object) -> list[tuple]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def backdate(data: Path) -> None:
    """A store as a controller left it an hour ago: telemetry, events, an ended terminal
    session, all an hour old, and the other tenant's fresh telemetry."""
    old = time.time() - HOUR
    async with SqliteStore(data / "controller.db") as store:
        for tenant, device in (("acme", "edge-1"), ("globex", "edge-9")):
            await store.device_connected(
                tenant, device, capabilities={}, reported_labels={}, manifest_version=None,
                remote="t", now=old,
            )  # fmt: skip
        await store.ingest_telemetry(
            "acme", "edge-1", [(s, "m", b"old") for s in range(1, 101)], now=old
        )
        await store.ingest_telemetry("globex", "edge-9", [(1, "m", b"g" * 5000)])
        await store.add_event("acme", "custom", now=old)
        audit = await store.start_session_audit("acme", "edge-1", operator="ops", now=old)
        await store.finish_session_audit(audit, now=old + 1)


async def test_a_live_controller_prunes(pki, tmp_path, monkeypatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    await backdate(data)
    monkeypatch.setenv(INTERVAL_ENV, "0.5s")  # the controller process inherits it
    ctl = Controller(
        pki,
        data,
        extra=[
            "--telemetry-retention", "60s",
            "--event-retention", "60s",
            "--audit-retention", "60s",
            "--telemetry-max-bytes", "1MiB",
        ],
    )  # fmt: skip
    monkeypatch.delenv(INTERVAL_ENV)
    main, tel = data / "controller.db", data / "controller.telemetry.db"
    try:
        # the backdated rows go within a pass or two of the start
        wait_for(
            lambda: (
                not query(tel, "SELECT 1 FROM telemetry WHERE tenant = 'acme'")
                and not query(main, "SELECT 1 FROM session_audits")
                and not query(main, "SELECT 1 FROM events WHERE kind = 'custom'")
            ),
            10,
            what=f"backdated rows pruned\n{ctl.log_tail()}",
        )
        assert "event=retention-pruned" in ctl.log()

        identity = pki.device("acme", "edge-1")
        conf = configuration(pki.dir, identity / "cert.pem", identity / "key.pem")
        conn = await open_connection(ctl.quic_port, conf)
        assert isinstance(await say_hello(conn, "edge-1"), m.HelloAck)
        stream = conn.open_stream()
        total = 0
        for first in range(101, 301, 40):  # 200 records of 10 kB, incompressible: 2 MB
            records = [(s, "m", os.urandom(RECORD)) for s in range(first, first + 40)]
            stream.send(encode_batch(records, oldest=1))
            total += len(records) * RECORD
            with anyio.fail_after(10):
                while True:
                    ack = await stream.receive()
                    if isinstance(ack, m.TelemetryAck) and ack.seq >= first + 39:
                        break
        assert total > 1.9 * MIB

        def acme() -> tuple[int, int, int]:
            [(n, used, lowest)] = query(
                tel,
                "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0), MIN(seq) FROM telemetry"
                " WHERE tenant = 'acme'",
            )
            return n, used, lowest

        wait_for(lambda: acme()[1] <= MIB, 10, what=f"acme under its cap\n{ctl.log_tail()}")
        n, used, lowest = acme()
        assert used > MIB - RECORD  # no more deleted than the cap needs
        assert lowest == 301 - n  # the newest records are the ones kept
        assert query(tel, "SELECT tenant, bytes FROM telemetry_usage ORDER BY tenant") == [
            ("acme", used),
            ("globex", 5000),
        ]
        assert query(tel, "SELECT COUNT(*) FROM telemetry WHERE tenant = 'globex'") == [(1,)]
        assert "over_cap={'acme'" in ctl.log()
        conn.close()
    finally:
        ctl.stop()
