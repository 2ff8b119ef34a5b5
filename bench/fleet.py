"""The transport bench's fleet: one controller, a broker or relays where the transport needs
them, and a few worker processes of simulated devices (:mod:`bench.fleet_worker`), any
transport, with progress on stderr while it runs.

Theory of operation. :func:`prepare_pki` makes one tenant (``bench``) and issues every device
its own identity directory (key, X.509-SVID, controller CA, tenant signing key), once per work
directory, so every transport and every run uses the same devices. :class:`ServerSide` starts
the real servers for a transport on loopback, pinned to the first core: ``margo-controller``
with the QUIC listener, the operator API, Margo's REST pull API and the HTTP/2 push server
all on one store; for ``mqtt`` a Mosquitto broker plus :mod:`bench.mqtt_host` (the same
controller with the MQTT bridge on its store). With an ``Impairment`` the devices reach the
servers through a seeded userspace relay (UDP for QUIC, TCP for the others), one relay
process, identical settings. :class:`Fleet` starts the workers on the other cores, says
``go``, shows progress, collects the devices' ``got`` reports (device, version, delivered at,
status acknowledged at; ``time.monotonic()``, shared by all processes on Linux), and reads
their byte counters on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.fleet_worker import device_name
from bench.processes import Worker, cpu_split, stop_process, wait_file
from bench.report_util import sample_process
from margo_stream.transport.quic_stack import DEFAULT_QUIC_STACK, QuicStack

TENANT = "bench"
TRANSPORTS = ("quic", "rest-poll", "h2-push", "mqtt", "tcp")
BIN = Path(sys.executable).parent
# the controller.json key of the endpoint each transport's devices dial ("tcp": the agent's TCP
# carrier, TLS over TCP with HTTP/2, margo-controller --tcp-listen)
ENDPOINT = {"quic": "quic", "rest-poll": "margo_api", "h2-push": "h2_push", "tcp": "tcp"}


def progress(text: str, *, final: bool = False) -> None:
    """One status line on stderr: rewritten in place on a terminal, throttled otherwise."""
    if sys.stderr.isatty():
        print("\r" + text + "   ", end="\n" if final else "", file=sys.stderr, flush=True)
    else:
        now = time.monotonic()
        if final or now - getattr(progress, "last", 0.0) >= 5.0:
            progress.last = now  # type: ignore[attr-defined]
            print(text, file=sys.stderr, flush=True)


def prepare_pki(work: Path, agents: int) -> Path:
    """``work/certs`` with a ``bench`` tenant and ``agents`` device identities (kept between
    calls); returns the directory holding the identity directories."""
    from margo_stream.identity.pki import init_pki, issue_device

    certs = work / "certs"
    if not (certs / TENANT / "ca.pem").exists():
        init_pki(certs, [TENANT], ["localhost", "127.0.0.1"])
    root = certs / TENANT / "devices"
    for i in range(agents):
        if not (root / device_name(i) / "signing.pub").exists():
            issue_device(certs, TENANT, device_name(i))
    return root


def operator_token(work: Path) -> str:
    return (work / "certs" / TENANT / "operator.token").read_text().strip()


# --------------------------------------------------------------------------- servers


class ServerSide:
    """The real servers one transport's devices talk to, started fresh for a run."""

    def __init__(
        self,
        transport: str,
        work: Path,
        tag: str,
        *,
        keepalive: float = 20.0,
        idle_timeout: float = 60.0,
        impairment: Any = None,
        congestion: str | None = None,
        link: str | None = None,
    ) -> None:
        # link: "relay" (bench.relay, userspace) or "tun" (bench.relay_tun: real packet loss)
        if (link or "relay") not in ("relay", "tun"):
            raise ValueError(f"link must be relay or tun, got {link!r}")
        self.link = link or "relay"
        self.transport = transport
        self.congestion = congestion
        self.work = work
        self.data = work / f"data-{tag}"
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.impairment = impairment
        self.proc: subprocess.Popen[bytes] | None = None
        self.broker: Any = None
        self.relay: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.ports: dict[str, int] = {}  # fixed after the first start, reused by restart()
        self.device_addr: tuple[str, int] = ("127.0.0.1", 0)
        self.relay_stats: dict[str, Any] | None = None

    @property
    def api(self) -> str:
        return str(self.info["api"])

    def pids(self) -> list[int]:
        pids = [self.proc.pid] if self.proc is not None else []
        if self.broker is not None and self.broker.proc is not None:
            pids.append(self.broker.proc.pid)
        return pids

    async def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        if self.transport == "mqtt" and self.broker is None:
            from bench.transports.mqtt import MosquittoBroker

            self.broker = MosquittoBroker(self.work / "certs", self.data / "mqtt", [TENANT])
            await self.broker.start()
            os.sched_setaffinity(self.broker.proc.pid, cpu_split()[0])
        await asyncio.to_thread(self._start_controller)
        if self.transport == "mqtt":
            port = self.broker.ports[TENANT]
        else:
            port = int(str(self.info[ENDPOINT[self.transport]]).rsplit(":", 1)[1])
        self.device_addr = ("127.0.0.1", port)
        if self.impairment is not None and self.relay is None:
            self.device_addr = await asyncio.to_thread(self._start_relay, port)

    def _start_controller(self) -> None:
        certs = self.work / "certs"
        listen = {
            name: f"127.0.0.1:{self.ports.get(name, 0)}"
            for name in ("quic", "api", "margo_api", "h2_push", "tcp")
        }
        common = [
            "--certs",
            str(certs),
            "--data",
            str(self.data),
            "--listen",
            listen["quic"],
            "--api",
            listen["api"],
            "--keepalive",
            str(self.keepalive),
            "--idle-timeout",
            str(self.idle_timeout),
            "--log-level",
            "warning",
        ]
        if self.transport == "mqtt":
            argv = [
                sys.executable,
                "-m",
                "bench.mqtt_host",
                *common,
                "--broker-dir",
                str(self.data / "mqtt"),
                "--bridge-port",
                str(self.broker.bridge_port),
            ]
        else:
            argv = [
                str(BIN / "margo-controller"),
                *common,
                "--margo-api",
                listen["margo_api"],
                "--h2-push",
                listen["h2_push"],
                *(["--tcp-listen", listen["tcp"]] if self.transport == "tcp" else []),
                *(["--congestion-control", self.congestion] if self.congestion else []),
            ]
        ready = self.data / ("mqtt-bridge.json" if self.transport == "mqtt" else "controller.json")
        ready.unlink(missing_ok=True)
        (self.data / "controller.json").unlink(missing_ok=True)
        with open(self.data / "controller.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        os.sched_setaffinity(self.proc.pid, cpu_split()[0])
        wait_file(ready, self.proc, 60)
        self.info = wait_file(self.data / "controller.json", self.proc, 10)
        for name in ("quic", "margo_api", "h2_push", "tcp"):
            if name in self.info:
                self.ports[name] = int(str(self.info[name]).rsplit(":", 1)[1])
        self.ports["api"] = int(str(self.info["api"]).rsplit(":", 1)[1])

    def _start_relay(self, port: int) -> tuple[str, int]:
        imp = self.impairment  # {"loss", "delay_ms", "jitter_ms", "seed"}: bench.relay's options
        argv = [
            sys.executable,
            "-m",
            "bench.relay_tun" if self.link == "tun" else "bench.relay",
            "udp" if self.transport == "quic" else "tcp",
            "--target",
            f"127.0.0.1:{port}",
            "--loss",
            str(imp.get("loss", 0.0)),
            "--delay-ms",
            str(imp.get("delay_ms", 0.0)),
            "--jitter-ms",
            str(imp.get("jitter_ms", 0.0)),
            "--seed",
            str(imp.get("seed", 1)),
        ]
        self.relay = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)
        os.sched_setaffinity(self.relay.pid, cpu_split()[0])
        assert self.relay.stdout is not None
        line = self.relay.stdout.readline().decode()  # "relay udp HOST:PORT -> ..."
        host, _, rport = line.split()[2].rpartition(":")
        return host, int(rport)

    def stop_controller(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    async def restart_controller(self) -> float:
        """Stop and start the controller on the same ports; returns when it is ready again
        (seconds the restart took)."""
        t0 = time.monotonic()
        await asyncio.to_thread(self.stop_controller)
        await asyncio.to_thread(self._start_controller)
        return time.monotonic() - t0

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_controller)
        if self.relay is not None:
            self.relay.send_signal(signal.SIGTERM)
            try:
                out, _ = await asyncio.to_thread(self.relay.communicate, timeout=10)
                self.relay_stats = json.loads(out or b"{}")
            except (subprocess.TimeoutExpired, ValueError):
                self.relay.kill()
            self.relay = None
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None


# --------------------------------------------------------------------------- workers


class WorkerProc(Worker):
    """One ``bench.fleet_worker`` process: ``bench.processes``' worker handle (commands, waits,
    progress, stop), with this worker's own events queued too; ``got`` reports go to
    ``on_got`` as they arrive."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        index: int,
        on_got: Callable[[list[list[Any]]], None],
    ) -> None:
        super().__init__(proc, index)
        self.events.update(
            {name: asyncio.Queue() for name in ("connected", "posted", "got", "probe")}
        )
        self.forward = asyncio.ensure_future(self._forward(on_got))

    async def _forward(self, on_got: Callable[[list[list[Any]]], None]) -> None:
        while True:
            on_got((await self.events["got"].get())["items"])

    async def stop(self) -> None:
        await super().stop()
        self.forward.cancel()


class Fleet:
    """``agents`` devices of one transport in ``procs`` worker processes."""

    worker_module = "bench.fleet_worker"  # what each worker process runs (``python -m``)

    def __init__(
        self,
        transport: str,
        identities: Path,
        work: Path,
        tag: str,
        agents: int,
        procs: int,
        *,
        poll_interval: float = 15.0,
        concurrency: int = 100,
        spread: float = 0.0,
        pin: bool = True,
        quic_stack: QuicStack = DEFAULT_QUIC_STACK,
    ) -> None:
        self.pin = pin
        self.quic_stack = quic_stack  # the QUIC devices' stack (the agent's --quic-stack)
        self.transport = transport
        self.identities = identities
        self.state = work / f"state-{tag}"
        self.logs = work / "logs"
        self.agents = agents
        self.procs = max(1, min(procs, agents))
        self.poll_interval = poll_interval
        self.concurrency = concurrency
        self.spread = spread
        self.workers: list[WorkerProc] = []
        self.ranges: list[range] = []  # device indices per worker
        self.got: list[list[Any]] = []  # [device, version, delivered_t, status_acked_t]
        self.waiters: list[tuple[Callable[[list[Any]], bool], asyncio.Event]] = []
        self.t_go = 0.0

    def _on_got(self, items: list[list[Any]]) -> None:
        self.got.extend(items)
        for item in items:
            for predicate, event in list(self.waiters):
                if predicate(item):
                    event.set()

    def worker_extra(self) -> dict[str, Any]:
        """More of each worker's configuration line (for subclasses)."""
        return {}

    async def start(self, host: str, port: int) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        # pinned: devices on the cores the servers do not use (fair CPU figures for the servers);
        # unpinned (``--set pin=0``): devices may also use the servers' core when it is idle
        cpus = cpu_split()[1] if self.pin else set()
        first = 0
        for i in range(self.procs):
            count = self.agents // self.procs + (1 if i < self.agents % self.procs else 0)
            log = open(self.logs / f"worker-{self.transport}-{i}.log", "ab")  # noqa: SIM115
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.worker_module,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                limit=1 << 24,
            )
            log.close()
            worker = WorkerProc(proc, i, self._on_got)
            cfg = {
                "transport": self.transport,
                "host": host,
                "port": port,
                "identities": str(self.identities),
                "state": str(self.state),
                "tenant": TENANT,
                "first": first,
                "count": count,
                "poll_interval": self.poll_interval,
                "concurrency": self.concurrency,
                "spread": self.spread,
                "cpus": sorted(cpus),
                "quic_stack": self.quic_stack,
                **self.worker_extra(),
            }
            await worker.send(json.dumps(cfg))
            self.workers.append(worker)
            self.ranges.append(range(first, first + count))
            first += count
        for worker in self.workers:
            await worker.wait("ready", 60)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    async def connect_all(self, timeout: float) -> list[float]:
        """``go`` to every worker; wait until every device connected once. Returns the
        seconds from ``go`` at which each device connected."""
        self.t_go = time.monotonic()
        for worker in self.workers:
            await worker.send("go")
        pending = [asyncio.ensure_future(w.wait("connected", timeout)) for w in self.workers]
        try:
            while not all(p.done() for p in pending):
                await asyncio.sleep(0.25)
                done = sum(w.connected for w in self.workers)
                errors = sum(w.failures for w in self.workers)
                elapsed = time.monotonic() - self.t_go
                progress(
                    f"{self.transport}: {done:,}/{self.agents:,} devices connected, "
                    f"{errors} failed attempts, {elapsed:.1f} s"
                )
            results = [p.result() for p in pending]
        finally:
            for p in pending:
                p.cancel()
        times = sorted(t - self.t_go for r in results for t in r["times"])
        progress(
            f"{self.transport}: {len(times):,}/{self.agents:,} devices connected in "
            f"{times[-1] if times else 0:.2f} s",
            final=True,
        )
        return times

    async def wait_got(
        self, predicate: Callable[[list[Any]], bool], timeout: float
    ) -> list[Any] | None:
        """The first ``got`` item (already seen or to come) matching ``predicate``."""
        for item in self.got:
            if predicate(item):
                return item
        event = asyncio.Event()
        entry = (predicate, event)
        self.waiters.append(entry)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return None
        finally:
            self.waiters.remove(entry)
        return next(item for item in reversed(self.got) if predicate(item))

    async def status(self) -> dict[str, Any]:
        for worker in self.workers:
            await worker.send("status")
        replies = [await w.wait("status", 60) for w in self.workers]
        total: dict[str, Any] = {}
        for reply in replies:
            for key, value in reply.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        total["failure_samples"] = sorted(
            {s for r in replies for s in r.get("failure_samples", [])}
        )[:5]
        return total

    async def post(self, count: int, timeout: float) -> dict[str, Any]:
        for worker in self.workers:
            await worker.send(f"post {count}")
        replies = [await w.wait("posted", timeout) for w in self.workers]
        return {
            "seconds": max(r["seconds"] for r in replies),
            "posted": sum(r["posted"] for r in replies),
            "failures": sum(r["failures"] for r in replies),
        }

    async def probe(self, index: int, count: int, gap: float) -> list[float | None]:
        """Device ``index`` times ``count`` interactive round trips, ``gap`` s apart."""
        worker = next(w for w, r in zip(self.workers, self.ranges, strict=True) if index in r)
        await worker.send(f"probe {index} {count} {gap}")
        return (await worker.wait("probe", count * (gap + 60) + 30))["rtts"]

    async def stop(self) -> None:
        for worker in self.workers:
            await worker.stop()
        self.workers = []


def sample_rss_cpu(pids: list[int]) -> tuple[int, float]:
    """Summed VmRSS (KB) and CPU seconds of these processes."""
    rss, cpu = 0, 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            s = sample_process(pid)
            rss += s.rss_kb
            cpu += s.cpu_s
    return rss, cpu
