"""``margo-bench store``: status writes/s and telemetry records/s into the PostgreSQL store and
into the SQLite store, in the same run, through the ``Store`` interface the controller uses.

- **Statuses**: ``--devices`` devices report ``--statuses`` deployment statuses in all, every
  device one after the other, all devices at once, through the controller's own write path
  (``controller.status.status_writer``: batches over ``put_status_batch``, as many at once
  as the store's ``write_concurrency``, devices hashed over them; what a fan-out's reports
  become). ``--status-writers K`` overrides K for both stores. Each status is checked
  against what was issued to the device, as in production.
- **Telemetry**: the same devices replay ``--records`` records in all, in batches of
  ``--batch`` (the agent's replay batch is 512), all devices at once, through each device's
  ``TelemetryWriter`` (the session's path); every batch is one transaction, exactly once.
  At the end every device's watermark and each store's byte count are checked.

PostgreSQL runs twice: with ``synchronous_commit=on`` (an acknowledged record survives a
crash of the server or of the machine) and ``off`` (it survives a crash of the controller;
SQLite's WAL with ``synchronous=NORMAL``, the embedded store's setting, is of that kind).
Without ``--dsn`` the bench starts a private server from the repository's
``tests/pg_server.py`` and turns ``fsync`` and ``full_page_writes`` back on (the test server
runs without them), so its figures are those of a durable server on this machine's disk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

from bench.report_util import machine_info, markdown_table, write_report
from controller.status import status_writer
from controller.store.factory import ControllerStore as Store
from controller.store.pg import PgStore
from controller.store.sqlite import SqliteStore

TENANT = "bench"
ROOT = Path(__file__).resolve().parents[1]


def _log(msg: str) -> None:
    print(f"[store] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def private_server() -> Iterator[str]:
    """A private PostgreSQL server (tests/pg_server.py) with ``fsync`` and
    ``full_page_writes`` on (the tests run it without them), and a fresh database; its DSN."""
    path = ROOT / "tests" / "pg_server.py"
    spec = importlib.util.spec_from_file_location("margo_pg_server", path)
    if spec is None or spec.loader is None or not path.exists():
        raise SystemExit(f"no --dsn and no {path} to start a private PostgreSQL server")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.pg_server(durable=True) as server:
        yield server.new_database()


async def server_settings(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        names = ("server_version", "fsync", "full_page_writes", "synchronous_commit")
        return {n: await conn.fetchval(f"SHOW {n}") for n in names}
    finally:
        await conn.close()


def with_setting(dsn: str, name: str, value: str) -> str:
    """The DSN with a server setting for every connection (asyncpg passes unknown query
    parameters to the server)."""
    return f"{dsn}{'&' if '?' in dsn else '?'}{name}={value}"


def manifest(version: int) -> bytes:
    return json.dumps(
        {"manifestVersion": version, "deployments": [{"deploymentId": "app"}]}
    ).encode()


async def prepare(store: Store, devices: list[str]) -> None:
    for d in devices:
        await store.device_connected(
            TENANT, d, capabilities={}, reported_labels={}, manifest_version=1, remote="bench"
        )
    await store.put_manifests(TENANT, [(d, 1, manifest(1), b"sig") for d in devices])


async def statuses(
    store: Store, devices: list[str], total: int, writers: int | None
) -> dict[str, Any]:
    per_device = max(1, total // len(devices))
    batcher = status_writer(store, writers)
    states = ("installing", "installed")

    async def device(d: str) -> int:
        stored = 0
        for seq in range(1, per_device + 1):
            doc = {
                "deploymentId": "app",
                "adoptedManifestVersion": 1,
                "status": {"state": states[seq % 2]},
                "components": [{"name": "c", "state": states[seq % 2]}],
            }
            stored += (await batcher.submit((TENANT, d, doc, seq))) is True
        return stored

    started = time.perf_counter()
    stored = sum(await asyncio.gather(*(device(d) for d in devices)))
    seconds = time.perf_counter() - started
    assert stored == per_device * len(devices), f"stored {stored} statuses"
    return {
        "statuses": stored,
        "writers": batcher.partitions,
        "seconds": seconds,
        "per_second": stored / seconds,
    }


async def telemetry(
    store: Store, devices: list[str], total: int, batch: int, payload_bytes: int
) -> dict[str, Any]:
    per_device = max(batch, total // len(devices) // batch * batch)
    payload = json.dumps({"temp": 21.5, "pad": "x" * max(0, payload_bytes - 28)}).encode()

    async def device(d: str) -> int:
        writer = await store.telemetry_writer(TENANT, d)
        watermark = 0
        for first in range(1, per_device + 1, batch):
            records = [(s, "metrics", payload) for s in range(first, first + batch)]
            watermark = await writer.ingest(records)
        return watermark

    started = time.perf_counter()
    marks = await asyncio.gather(*(device(d) for d in devices))
    seconds = time.perf_counter() - started
    assert marks == [per_device] * len(devices), "a watermark is short"
    records = per_device * len(devices)
    usage = await store.telemetry_usage()
    assert usage == {TENANT: records * len(payload)}, usage
    return {
        "records": records,
        "batch": batch,
        "payload_bytes": len(payload),
        "seconds": seconds,
        "per_second": records / seconds,
    }


async def one_store(name: str, store: Store, args: argparse.Namespace) -> dict[str, Any]:
    devices = [f"dev-{i:05d}" for i in range(args.devices)]
    await store.open()
    try:
        await prepare(store, devices)
        _log(f"{name}: statuses ...")
        st = await statuses(store, devices, args.statuses, args.status_writers)
        _log(f"{name}: {st['per_second']:,.0f} statuses/s; telemetry ...")
        tm = await telemetry(store, devices, args.records, args.batch, args.payload)
        _log(f"{name}: {tm['per_second']:,.0f} records/s")
    finally:
        await store.close()
    return {"store": name, "statuses": st, "telemetry": tm}


async def run(args: argparse.Namespace, dsn: str, tmp: Path) -> dict[str, Any]:
    settings = await server_settings(dsn)
    results = [await one_store("sqlite", SqliteStore(tmp / "controller.db"), args)]
    for sync in ("on", "off"):
        # a fresh schema per run: drop what the previous one left
        conn = await asyncpg.connect(dsn)
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await conn.close()
        store = PgStore(with_setting(dsn, "synchronous_commit", sync))
        results.append(await one_store(f"postgresql (synchronous_commit={sync})", store, args))
    return {"postgresql": settings, "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="margo-bench store", description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="an empty PostgreSQL database (default: a private server)")
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--statuses", type=int, default=20_000, help="status writes in all")
    p.add_argument(
        "--status-writers",
        type=int,
        metavar="K",
        help="status batches in flight at once (default: each store's write_concurrency)",
    )
    p.add_argument("--records", type=int, default=500_000, help="telemetry records in all")
    p.add_argument("--batch", type=int, default=512, help="records per telemetry batch")
    p.add_argument("--payload", type=int, default=100, help="bytes per telemetry record")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    machine = machine_info(("asyncpg", "anyio"))
    with tempfile.TemporaryDirectory(prefix="margo-store-") as tmp:
        with contextlib.ExitStack() as stack:
            dsn = args.dsn or stack.enter_context(private_server())
            data = asyncio.run(run(args, dsn, Path(tmp)))
    data.update(machine=machine, parameters=vars(args) | {"out": str(args.out)})
    rows = [
        (
            r["store"],
            round(r["statuses"]["per_second"]),
            r["statuses"]["writers"],
            round(r["telemetry"]["per_second"]),
            r["telemetry"]["records"],
        )
        for r in data["results"]
    ]
    table = markdown_table(
        ["store", "status writes/s", "status writers", "telemetry records/s", "records"], rows
    )
    pg = data["postgresql"]
    note = (
        f"PostgreSQL {pg['server_version']}, fsync={pg['fsync']},"
        f" full_page_writes={pg['full_page_writes']}; {args.devices} devices at once,"
        f" telemetry batches of {args.batch} records of {args.payload} bytes."
    )
    json_path, md_path = write_report(
        args.out, "store", data, "Store throughput: PostgreSQL and SQLite", [table, note]
    )
    print(table + "\n" + note)
    _log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
