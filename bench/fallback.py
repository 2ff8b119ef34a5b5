"""``margo-bench fallback``: how long the real agent takes to get through when UDP is blocked,
to come back after a restart, and to move back to QUIC when UDP returns.

One real ``margo-controller`` (``--listen`` and ``--tcp-listen``) and one real ``margo-agent``
process; between them one loopback port relays UDP to the QUIC listener and TCP to the TCP
listener (:mod:`bench.relay_udp` and :mod:`bench.relay_tcp` in this process, ``delay_ms`` each
way on both), the UDP side blackholed to start with. Per run:

1. **fallback**: agent start -> the controller's API shows it connected over TCP (the QUIC
   wait, ``--quic-timeout``, is most of it);
2. **restart**: the agent stopped and started again, UDP still blocked -> connected over TCP
   (the remembered carrier: no QUIC wait);
3. **move back**: the blackhole lifted -> the API shows ``transport: quic`` (the probe waits for
   ``--quic-retry`` after the last QUIC failure, then one handshake; the move itself is
   ``move_s``, from the log's "moving" line to the API). A producer writes telemetry the
   whole time; records lost and stored twice are counted.

Writes ``<out>/fallback.json`` and ``<out>/fallback.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.impairment import Impairment
from bench.processes import stop_process
from bench.relay_tcp import TcpRelay
from bench.relay_udp import UdpRelay
from bench.report_util import machine_info, write_json

BIN = Path(sys.executable).parent
TENANT = "acme"
DEVICE = "press-01"


def _proc(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


async def _wait(what: str, check: Any, timeout: float, interval: float = 0.02) -> float:
    """Seconds until ``await check()`` is true (``TimeoutError`` naming ``what``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await check():
            return time.monotonic() - t0
        await asyncio.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:g} s")


class Run:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        self.data = work / "data"
        self.state = work / "agent"
        self.agent: subprocess.Popen[bytes] | None = None

    def start_controller(self) -> dict[str, Any]:
        from margo_stream.identity.pki import init_pki, issue_device

        certs = self.work / "certs"
        init_pki(certs, [TENANT], ["localhost", "127.0.0.1"])
        self.identity = issue_device(certs, TENANT, DEVICE)
        self.token = (certs / TENANT / "operator.token").read_text().strip()
        self.data.mkdir(parents=True, exist_ok=True)
        argv = [str(BIN / "margo-controller"), "--certs", str(certs), "--data", str(self.data)]
        argv += ["--listen", "127.0.0.1:0", "--tcp-listen", "127.0.0.1:0", "--api", "127.0.0.1:0"]
        argv += ["--keepalive", "1", "--log-level", "warning"]
        self.controller = _proc(argv, self.work / "controller.log")
        ready = self.data / "controller.json"
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.controller.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"controller did not start: see {self.work}/controller.log")
            time.sleep(0.05)
        time.sleep(0.05)
        info: dict[str, Any] = json.loads(ready.read_text())
        return info

    def start_agent(self, port: int) -> None:
        a = self.args
        argv = [str(BIN / "margo-agent"), "--identity", str(self.identity)]
        argv += ["--controller", f"127.0.0.1:{port}", "--state", str(self.state)]
        argv += ["--quic-timeout", str(a.quic_timeout), "--quic-retry", str(a.quic_retry)]
        argv += ["--keepalive", "1", "--commit-window-ms", "1", "--log-format", "text"]
        argv += ["--backoff-base", "0.1", "--backoff-cap", "1"]
        self.agent = _proc(argv, self.work / "agent.log")

    async def transport(self, client: httpx.AsyncClient, api: str) -> str | None:
        r = await client.get(
            f"{api}/api/v1/devices/{DEVICE}", headers={"Authorization": f"Bearer {self.token}"}
        )
        if r.status_code != 200 or not r.json().get("connected"):
            return None
        return str(r.json().get("transport"))

    async def telemetry(self, client: httpx.AsyncClient, api: str) -> list[int]:
        ns: list[int] = []
        after = 0
        while True:
            r = await client.get(
                f"{api}/api/v1/devices/{DEVICE}/telemetry",
                params={"after": after, "limit": 1000},
                headers={"Authorization": f"Bearer {self.token}"},
            )
            items = r.json()["items"]
            if not items:
                return ns
            ns += [int(i["n"]) for i in items]
            after = items[-1]["seq"]


def _agent_status(state: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state / "agent-status.json").read_text()))
    except (OSError, ValueError):
        return {}


def _producer(state: Path, stop: threading.Event, acked: list[int]) -> None:
    from margo_stream.telemetry_client import TelemetryClient

    client = TelemetryClient(state / "telemetry.sock")
    n = 0
    while not stop.is_set():
        try:
            client.emit("fallback", {"n": n})
        except Exception:  # noqa: BLE001 - the agent restarts: try again shortly
            time.sleep(0.05)
            client = TelemetryClient(state / "telemetry.sock")
            continue
        acked.append(n)
        n += 1
        time.sleep(0.01)


async def one_run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    run = Run(work, args)
    info = await asyncio.to_thread(run.start_controller)
    quic = str(info["quic"]).rsplit(":", 1)
    tcp = str(info["tcp"]).rsplit(":", 1)
    link = Impairment(delay_ms=args.delay_ms, seed=1)
    udp = UdpRelay(("127.0.0.1", 0), (quic[0], int(quic[1])), link)
    stop = threading.Event()
    acked: list[int] = []
    result: dict[str, Any] = {}
    try:
        async with udp:
            udp.blackhole(True)
            async with TcpRelay(("127.0.0.1", udp.port), (tcp[0], int(tcp[1])), link):
                async with httpx.AsyncClient(timeout=10) as client:
                    api = str(info["api"])

                    async def on(carrier: str) -> bool:
                        return await run.transport(client, api) == carrier

                    async def off() -> bool:
                        return await run.transport(client, api) is None

                    run.start_agent(udp.port)
                    result["fallback_s"] = await _wait("fallback", lambda: on("tcp"), 60)

                    async def agent_on_tcp() -> bool:  # the agent's side of it (and its memory)
                        return _agent_status(run.state).get("transport") == "tcp"

                    await _wait("the agent's status", agent_on_tcp, 30)
                    assert run.agent is not None
                    await asyncio.to_thread(stop_process, run.agent)
                    await _wait("disconnect", lambda: off(), 30)
                    run.start_agent(udp.port)
                    result["restart_s"] = await _wait("restart", lambda: on("tcp"), 60)
                    producer = threading.Thread(
                        target=_producer, args=(run.state, stop, acked), daemon=True
                    )
                    producer.start()
                    await asyncio.sleep(1.0)
                    udp.blackhole(False)
                    result["move_back_s"] = await _wait(
                        "move back", lambda: on("quic"), args.quic_retry + 60
                    )
                    log = (work / "agent.log").read_text(errors="replace")
                    result["moved_in_log"] = "moving the session from TCP to QUIC" in log
                    await asyncio.sleep(1.0)
                    stop.set()
                    await asyncio.to_thread(producer.join, 10)
                    await asyncio.sleep(1.0)
                    ns = await run.telemetry(client, api)
                    result["records_acked"] = len(acked)
                    result["records_lost"] = len(set(acked) - set(ns))
                    result["records_duplicated"] = len(ns) - len(set(ns))
    finally:
        stop.set()
        if run.agent is not None:
            await asyncio.to_thread(stop_process, run.agent)
        await asyncio.to_thread(stop_process, run.controller)
    return result


def markdown(doc: dict[str, Any]) -> str:
    p = doc["params"]
    lines = [
        f"# margo-bench fallback ({p['runs']} runs, --quic-timeout {p['quic_timeout']} s, "
        f"--quic-retry {p['quic_retry']} s, {p['delay_ms']} ms each way)",
        "",
        "| run | fallback s | restart s | move back s | records | lost | twice |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in enumerate(doc["runs"], 1):
        if "error" in r:
            lines.append(f"| {n} | {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {n} | {r['fallback_s']:.2f} | {r['restart_s']:.2f} | {r['move_back_s']:.2f} | "
            f"{r['records_acked']} | {r['records_lost']} | {r['records_duplicated']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="margo-bench fallback", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quic-timeout", type=float, default=5.0)
    p.add_argument("--quic-retry", type=float, default=20.0)
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay on both relays")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--work", type=Path, help="work directory (kept if given)")
    args = p.parse_args(argv)
    runs = []
    for n in range(args.runs):
        work = (args.work / f"run{n + 1}") if args.work else Path(tempfile.mkdtemp(prefix="fb-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            result = asyncio.run(one_run(work, args))
        except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
        print(f"run {n + 1}: {result}", file=sys.stderr, flush=True)
        runs.append(result)
    doc = {
        "kind": "margo-bench fallback",
        "command": "margo-bench fallback " + " ".join(argv),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {**machine_info(), "loadavg_at_end": os.getloadavg()},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "fallback.json", doc)
    (args.out / "fallback.md").write_text(markdown(doc))
    print(f"wrote {args.out / 'fallback.json'} and {args.out / 'fallback.md'}", file=sys.stderr)
    return 0
