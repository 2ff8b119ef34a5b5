"""``margo-bench ingest``: the controller's telemetry ingest rate with many agents replaying at
once. One real controller process; ``--agents`` simulated agents in ``--procs`` worker
processes (``bench.ingest_worker``) connect, then all start replaying ``--records`` records
each at the same moment. The rate is all records over the time from the first batch sent to
the last one acknowledged (acks mean stored durably in the controller's SQLite store); the
store is then checked for every device's last record."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.report_util import machine_info, markdown_table, median, write_report
from margo_stream.identity.pki import init_pki, issue_device

BIN = Path(sys.executable).parent
TENANT = "bench"


def _log(msg: str) -> None:
    print(f"[ingest] {msg}", file=sys.stderr, flush=True)


def one_run(
    agents: int, procs: int, records: int, record_bytes: int, batch: int, in_flight: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="margo-ingest-") as tmp:
        root = Path(tmp)
        certs = root / "certs"
        init_pki(certs, [TENANT], ["localhost", "127.0.0.1"])
        issue_device(certs, TENANT, "bench-template")
        token = (certs / TENANT / "operator.token").read_text().strip()
        data = root / "data"
        data.mkdir()
        ctl = subprocess.Popen(
            [
                str(BIN / "margo-controller"),
                "--certs",
                str(certs),
                "--data",
                str(data),
                "--listen",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
            ],
            stdout=open(root / "controller.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        workers: list[subprocess.Popen] = []
        try:
            ready = data / "controller.json"
            deadline = time.monotonic() + 30
            while not ready.exists():
                if time.monotonic() > deadline or ctl.poll() is not None:
                    raise RuntimeError(f"controller did not start; see {root / 'controller.log'}")
                time.sleep(0.05)
            info = json.loads(ready.read_text())
            port = int(info["quic"].rsplit(":", 1)[1])
            per = -(-agents // procs)
            for k in range(procs):
                count = min(per, agents - k * per)
                cfg = {
                    "host": "127.0.0.1",
                    "port": port,
                    "certs": str(certs),
                    "tenant": TENANT,
                    "template": str(certs / TENANT / "devices" / "bench-template"),
                    "server_name": TENANT,  # the controller presents the tenant's certificate
                    "idle_timeout": 60.0,
                    "first": k * per,
                    "count": count,
                    "records": records,
                    "record_bytes": record_bytes,
                    "batch": batch,
                    "in_flight": in_flight,
                }
                w = subprocess.Popen(
                    [sys.executable, "-m", "bench.ingest_worker"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert w.stdin is not None
                w.stdin.write(json.dumps(cfg) + "\n")
                w.stdin.flush()
                workers.append(w)
            for w in workers:
                assert w.stdout is not None
                if json.loads(w.stdout.readline()).get("ev") != "ready":
                    raise RuntimeError("a worker failed to connect its agents")
            _log(f"{agents} agents connected; replaying {records} records each")
            for w in workers:
                assert w.stdin is not None
                w.stdin.write("go\n")
                w.stdin.flush()
            results: list[dict[str, float]] = []
            for w in workers:
                assert w.stdout is not None
                line = w.stdout.readline()
                if not line:
                    raise RuntimeError("a worker died during the replay")
                results.extend(json.loads(line)["results"])
            start = min(r["start"] for r in results)
            end = max(r["done"] for r in results)
            total = agents * records
            headers = {"Authorization": f"Bearer {token}"}
            stored = 0
            for i in range(agents):
                r = httpx.get(
                    f"{info['api']}/api/v1/devices/sim-{i:05d}/telemetry",
                    params={"limit": 1},
                    headers=headers,
                    timeout=30,
                )
                items = r.json().get("items") or []
                stored += bool(items) and items[-1]["seq"] == records
            return {
                "agents": agents,
                "procs": procs,
                "records_per_agent": records,
                "record_bytes": record_bytes,
                "total_records": total,
                "seconds": end - start,
                "rate_per_s": total / (end - start),
                "devices_complete": stored,
            }
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
            ctl.terminate()
            ctl.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="margo-bench ingest", description=__doc__)
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--records", type=int, default=20_000, help="records per agent")
    p.add_argument("--record-bytes", type=int, default=200)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--in-flight", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/out/ingest"))
    args = p.parse_args(argv)
    runs = []
    for i in range(args.runs):
        run = one_run(
            args.agents, args.procs, args.records, args.record_bytes, args.batch, args.in_flight
        )
        _log(
            f"run {i + 1}/{args.runs}: {run['rate_per_s']:,.0f} records/s, "
            f"{run['devices_complete']}/{args.agents} devices complete"
        )
        runs.append(run)
    rows = [
        [i + 1, r["total_records"], r["seconds"], r["rate_per_s"], r["devices_complete"]]
        for i, r in enumerate(runs)
    ]
    rows.append(["median", "", median(r[2] for r in rows), median(r[3] for r in rows), ""])
    table = markdown_table(["run", "records", "seconds", "records/s", "devices complete"], rows)
    write_report(
        args.out,
        "ingest",
        {
            "scenario": "ingest",
            "argv": argv or sys.argv[1:],
            "machine": machine_info(),
            "runs": runs,
            "date": time.strftime("%Y-%m-%d"),
        },
        f"ingest: {args.agents} agents x {args.records} records",
        [table],
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
