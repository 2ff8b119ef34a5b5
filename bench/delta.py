"""``margo-bench delta``: bytes on the wire for a desired-state change, counted at the UDP level.

A real controller and a real agent connected through the bench's UDP relay (no impairment:
the relay only counts). A ``process`` deployment with five extra files (``--file-bytes``
each) is applied, then one parameter is changed, then nothing is changed (a re-apply of the
same document). For each step the relay's datagram bytes both ways are taken from the apply
until the device's ``installed`` status is stored, minus the keepalive traffic of an idle
window of the same length. The second step must carry only the changed document: the five
files are already on the device and are not sent again.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench.pushlat import installed, one_device_pki, watching
from bench.relay import Impairment, UdpRelay
from bench.report_util import machine_info, markdown_table, median, write_report
from bench.signing import Signer

BIN = Path(sys.executable).parent
DEVICE = "delta-01"
DOC = """\
apiVersion: application.margo.org/v1alpha1
kind: ApplicationDeployment
metadata:
  annotations: {{applicationId: delta-probe, id: delta-probe}}
  name: delta-probe
  namespace: bench
spec:
  deploymentProfile:
    type: process
    components:
      - name: probe
        properties:
          command: ["sleep", "3600"]
  files:
{files}  parameters:
    value:
      value: "{value}"
      targets: [{{pointer: ENV.VALUE, components: [probe]}}]
"""


def _log(msg: str) -> None:
    print(f"[delta] {msg}", file=sys.stderr, flush=True)


async def _bytes_for(
    relay: UdpRelay,
    client: httpx.AsyncClient,
    watch: Any,
    body: dict[str, Any],
    expect_status: bool,
) -> tuple[int, float]:
    before = relay.stats()
    t0 = time.perf_counter()
    if expect_status:
        event, _ = watch.expect(installed(DEVICE, "delta-probe"))
    r = await client.post("/api/v1/deployments", json=body)
    r.raise_for_status()
    if expect_status:
        with anyio.fail_after(30):
            await event.wait()
    await anyio.sleep(0.3)  # let the last acks and the status round trip finish
    after = relay.stats()
    moved = (
        after.upstream.bytes_forwarded
        - before.upstream.bytes_forwarded
        + after.downstream.bytes_forwarded
        - before.downstream.bytes_forwarded
    )
    return moved, time.perf_counter() - t0


async def one_run(file_bytes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="margo-delta-") as tmp:
        root = Path(tmp)
        certs, ident, token = one_device_pki(root, DEVICE)
        signer = Signer.for_tenant(certs, "bench")
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
        agent: subprocess.Popen | None = None
        try:
            while not (data / "controller.json").exists():
                if ctl.poll() is not None:
                    raise RuntimeError(f"controller did not start; see {root}/controller.log")
                await anyio.sleep(0.05)
            info = json.loads((data / "controller.json").read_text())
            quic_port = int(info["quic"].rsplit(":", 1)[1])
            blobs = [os.urandom(file_bytes) for _ in range(5)]
            listing = "".join(
                f"    - {{name: conf/file{i}.bin, digest: 'sha256:"
                f"{hashlib.sha256(b).hexdigest()}'}}\n"
                for i, b in enumerate(blobs)
            )
            encoded = [base64.b64encode(b).decode() for b in blobs]

            def body(value: str) -> dict[str, Any]:
                return signer.body(
                    [DOC.format(files=listing, value=value)], devices=[DEVICE], blobs=encoded
                )

            async with UdpRelay(
                ("127.0.0.1", 0), ("127.0.0.1", quic_port), Impairment(seed=1)
            ) as relay:
                agent = subprocess.Popen(
                    [
                        str(BIN / "margo-agent"),
                        "--identity",
                        str(ident),
                        "--state",
                        str(root / "agent"),
                        "--controller",
                        f"127.0.0.1:{relay.port}",
                        "--metrics-interval",
                        "3600",
                    ],
                    stdout=open(root / "agent.log", "ab"),
                    stderr=subprocess.STDOUT,
                )
                async with watching(info["api"], token) as (client, watch):
                    while True:
                        r = await client.get(f"/api/v1/devices/{DEVICE}")
                        if r.status_code == 200 and r.json()["connected"]:
                            break
                        await anyio.sleep(0.05)
                    await anyio.sleep(0.5)
                    first, t1 = await _bytes_for(relay, client, watch, body("one"), True)
                    change, t2 = await _bytes_for(relay, client, watch, body("two"), True)
                    same, t3 = await _bytes_for(relay, client, watch, body("two"), False)
                    idle0 = relay.stats()
                    await anyio.sleep(max(t1, t2, t3))
                    idle1 = relay.stats()
                    idle = (
                        idle1.upstream.bytes_forwarded
                        - idle0.upstream.bytes_forwarded
                        + idle1.downstream.bytes_forwarded
                        - idle0.downstream.bytes_forwarded
                    )
            document_bytes = len(DOC.format(files=listing, value="two").encode())
            return {
                "file_bytes": file_bytes,
                "files": 5,
                "document_bytes": document_bytes,
                "first_apply_bytes": first,
                "one_parameter_change_bytes": change,
                "unchanged_reapply_bytes": same,
                "idle_bytes_same_window": idle,
                "files_total_bytes": 5 * file_bytes,
            }
        finally:
            for proc in (agent, ctl):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="margo-bench delta", description=__doc__)
    p.add_argument("--file-bytes", type=int, default=64 * 1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/out/delta"))
    args = p.parse_args(argv)
    runs = []
    for i in range(args.runs):
        runs.append(anyio.run(one_run, args.file_bytes, backend_options={"use_uvloop": True}))
        _log(f"run {i + 1}: {runs[-1]}")
    keys = [
        "first_apply_bytes",
        "one_parameter_change_bytes",
        "unchanged_reapply_bytes",
        "idle_bytes_same_window",
    ]
    rows = [
        [k.replace("_", " "), median(r[k] for r in runs), " / ".join(str(r[k]) for r in runs)]
        for k in keys
    ]
    rows.append(["document bytes (the changed blob)", runs[0]["document_bytes"], ""])
    rows.append(["five files, bytes", runs[0]["files_total_bytes"], ""])
    table = markdown_table(
        ["bytes on the wire (UDP payload, both ways)", "median", "per run"], rows
    )
    write_report(
        args.out,
        "delta",
        {
            "scenario": "delta",
            "argv": argv or sys.argv[1:],
            "machine": machine_info(),
            "runs": runs,
            "date": time.strftime("%Y-%m-%d"),
        },
        "delta: bytes on the wire per desired-state change",
        [table],
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
