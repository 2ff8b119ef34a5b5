"""A worker process of simulated agents for ``margo-bench`` (one event loop, uvloop).

In ``margo`` mode every simulated agent runs the real agent protocol code on the agent's QUIC
stack (``quic_stack``: qh3 by default, as ``margo-agent --quic-stack``): its dial, connection
and ``AgentSession`` (hello, HelloAck, keepalive pings, dead-link detection), with its own
freshly issued device certificate held in memory. The only
thing simulated is the agent *object* ``AgentSession`` talks to (:class:`SimAgent`): a fixed
hello, no features. In ``bare`` mode the worker runs plain aioquic clients instead
(:mod:`bench.bare_quic`), for the reference figure.

The worker talks to the orchestrator (:mod:`bench.connect`) in JSON lines. It reads one line of
configuration on stdin, prepares (issues certificates), prints ``{"ev": "ready"}``, and then
obeys commands, one per line: ``go`` starts the ramp (at most ``concurrency`` handshakes in
flight), ``status`` prints how many connections are alive, ``stop`` (or EOF) closes them all
and exits. During the ramp it prints ``progress`` lines, and ``ramped`` with every agent's
completion time (``time.monotonic()``, shared by all processes on Linux) once every agent is
connected or gave up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.session import AgentSession, HelloRefused
from bench import bare_quic
from bench.report_util import raise_nofile_limit
from margo_stream import __version__
from margo_stream.gcpolicy import gc_policy_running
from margo_stream.identity.allowed_files import ALLOWED_DIR, allowed_document
from margo_stream.identity.pki import load_tenant_ca, make_leaf
from margo_stream.identity.spiffe import device_spiffe_id
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode
from margo_stream.transport.connection import ConnectionLost
from margo_stream.transport.quic_stack import (
    DEFAULT_QUIC_STACK,
    agent_configuration,
    dial,
    with_identity,
)

PROGRESS_INTERVAL = 0.25


def device_id(index: int) -> str:
    return f"sim-{index:05d}"


@dataclasses.dataclass(frozen=True, slots=True)
class SimConfig:
    """The part of ``AgentConfig`` an ``AgentSession`` reads."""

    connect_timeout: float
    keepalive: float | None = None  # None: what the controller's HelloAck says


class SimAgent:
    """The agent object an ``AgentSession`` needs, and nothing more: no features, no state
    directory, a fixed capabilities document."""

    __slots__ = ("config", "device_id")
    stream_handlers: dict[Any, Any] = {}
    session_tasks: list[Any] = []

    def __init__(self, config: SimConfig, device_id: str) -> None:
        self.config = config
        self.device_id = device_id

    def make_hello(self) -> m.Hello:
        caps = m.Capabilities(
            id=self.device_id,
            cpus=[m.Cpu(cores=2, architecture="x86_64")],
            memory="1 Gi",
            interfaces=[m.TypedItem(type="ethernet")],
            supportedRuntimes=["process"],
            supportedDeploymentTypes=["process"],
            labels={"fleet": "bench"},
        )
        return m.Hello(device_id=self.device_id, agent_version=__version__, capabilities=caps)


class _Permit:
    """One handshake's place in the window; released once, when the agent is ready or failed."""

    __slots__ = ("sem", "held", "started")

    def __init__(self, sem: anyio.Semaphore) -> None:
        self.sem = sem
        self.held = True
        self.started = 0.0

    def release(self) -> None:
        if self.held:
            self.held = False
            self.sem.release()


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"ev": event, **fields}) + "\n")
    sys.stdout.flush()


class Fleet:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.mode: str = cfg["mode"]
        self.host: str = cfg["host"]
        self.port: int = int(cfg["port"])
        self.first: int = int(cfg["first"])
        self.count: int = int(cfg["count"])
        self.timeout: float = float(cfg.get("timeout", 20.0))
        self.retries: int = int(cfg.get("retries", 3))
        self.sim_config = SimConfig(
            connect_timeout=self.timeout, keepalive=cfg.get("agent_keepalive")
        )
        self.quic_stack = cfg.get("quic_stack", DEFAULT_QUIC_STACK)  # margo mode: the agent's
        self.configs: list[Any] = []  # one QUIC client configuration per agent
        self.live: dict[int, Any] = {}  # index -> Connection or bare protocol
        self.ready_times: list[float] = []
        self.latencies: list[float] = []  # acquire -> ready, seconds, successful attempts only
        self.failures: list[str] = []
        self.gave_up = 0
        self.lost = 0  # connections that ended before ``stop``
        self.stopping = False
        self.stop_event: anyio.Event | None = None
        self.sem: anyio.Semaphore | None = None

    # --- preparation -----------------------------------------------------------------------------
    def prepare(self) -> None:
        if self.mode == "bare":
            bare = bare_quic.client_config(
                self.cfg["cafile"],
                server_name=self.cfg["server_name"],
                idle_timeout=self.cfg["idle_timeout"],
            )
            self.configs = [bare] * self.count
            return
        template = Path(self.cfg["template"])
        base = agent_configuration(
            self.quic_stack,
            str(template / "cert.pem"),
            str(template / "key.pem"),
            str(template / "ca.pem"),
            server_name=self.cfg["server_name"],
            idle_timeout=self.cfg["idle_timeout"],
        )
        # the tenant CA (what verifies the controller) as bytes: no file read per handshake
        base = dataclasses.replace(base, cadata=(template / "ca.pem").read_bytes(), cafile=None)
        ca_cert, ca_key = load_tenant_ca(Path(self.cfg["certs"]), self.cfg["tenant"])
        # the controller admits only allowed identities: one allow file per simulated device
        # (read by the controller's reload, or at the device's first handshake)
        allowed = Path(self.cfg["certs"]) / self.cfg["tenant"] / ALLOWED_DIR
        allowed.mkdir(mode=0o700, exist_ok=True)
        now = datetime.now(UTC)
        for i in range(self.first, self.first + self.count):
            cert, key = make_leaf(
                ca_cert,
                ca_key,
                uris=[device_spiffe_id(self.cfg["tenant"], device_id(i))],
                not_before=now - timedelta(minutes=5),
                not_after=now + timedelta(days=1),
                eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
                common_name=device_id(i),
            )
            tmp = allowed / f".{device_id(i)}.json.tmp"
            tmp.write_bytes(allowed_document(device_id(i), cert))
            os.replace(tmp, allowed / f"{device_id(i)}.json")  # no fsync: a bench's scratch
            self.configs.append(with_identity(base, cert, key))

    # --- one agent -------------------------------------------------------------------------------
    async def run_agent(self, slot: int) -> None:
        index = self.first + slot
        attempt = 0
        while not self.stopping:
            attempt += 1
            assert self.sem is not None
            await self.sem.acquire()
            permit = _Permit(self.sem)
            permit.started = time.monotonic()
            try:
                established = await (
                    self._margo_once(slot, index, permit)
                    if self.mode == "margo"
                    else self._bare_once(slot, permit)
                )
            except Exception as exc:  # noqa: BLE001 - every failure is counted, then retried
                established = False
                self.failures.append(f"{type(exc).__name__}: {exc}"[:200])
            finally:
                permit.release()
            if established or self.stopping:
                return
            if attempt > self.retries:
                self.gave_up += 1
                return
            await anyio.sleep(0.2 + random.random())

    async def _margo_once(self, slot: int, index: int, permit: _Permit) -> bool:
        conn, transport = await dial(self.host, self.port, self.configs[slot])
        self.live[slot] = conn
        ready = [False]
        try:
            with anyio.fail_after(self.timeout):
                await conn.wait_handshake()
            session = AgentSession(SimAgent(self.sim_config, device_id(index)), conn)

            def on_ready(_: AgentSession) -> None:
                ready[0] = True
                self._ready(permit)

            await session.run(on_ready=on_ready)
        except (ConnectionLost, HelloRefused):
            if not ready[0]:
                raise
        finally:
            self.live.pop(slot, None)
            conn.close(ErrorCode.NO_ERROR, "bench finished")
            conn.cancel_timer()
            transport.close()
        if not ready[0]:
            raise ConnectionLost(0, "closed before the hello was answered", by_peer=True)
        if not self.stopping:
            self.lost += 1
        return True

    async def _bare_once(self, slot: int, permit: _Permit) -> bool:
        transport, protocol = await bare_quic.open_client(self.host, self.port, self.configs[slot])
        try:
            with anyio.fail_after(self.timeout):
                await protocol.wait_connected()
            self._ready(permit)
            self.live[slot] = protocol
            assert self.stop_event is not None
            await self.stop_event.wait()
            return True
        finally:
            self.live.pop(slot, None)
            if protocol.terminated and not self.stopping:
                self.lost += 1
            protocol.close()
            transport.close()

    def _ready(self, permit: _Permit) -> None:
        now = time.monotonic()
        self.ready_times.append(now)
        self.latencies.append(now - permit.started)
        permit.release()

    # --- the worker ------------------------------------------------------------------------------
    def alive(self) -> int:
        if self.mode == "margo":
            return sum(1 for c in self.live.values() if c.closed is None)
        return sum(1 for p in self.live.values() if not p.terminated)

    async def ramp(self, concurrency: int) -> None:
        self.sem = anyio.Semaphore(concurrency)
        self.stop_event = anyio.Event()
        async with anyio.create_task_group() as tg:
            for slot in range(self.count):
                tg.start_soon(self.run_agent, slot)
            tg.start_soon(self._report_ramp)
            await self.stop_event.wait()
            self.stopping = True
            for conn in list(self.live.values()):
                conn.close()
            with anyio.move_on_after(10):
                while self.live:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()

    async def _report_ramp(self) -> None:
        while not self.stopping:
            done = len(self.ready_times) + self.gave_up
            _emit(
                "progress",
                connected=len(self.ready_times),
                gave_up=self.gave_up,
                failures=len(self.failures),
                t=time.monotonic(),
            )
            if done >= self.count:
                _emit(
                    "ramped",
                    times=self.ready_times,
                    latencies=self.latencies,
                    gave_up=self.gave_up,
                    failures=len(self.failures),
                    failure_samples=sorted(set(self.failures))[:5],
                )
                return
            await anyio.sleep(PROGRESS_INTERVAL)

    async def serve(self) -> None:
        t0 = time.monotonic()
        self.prepare()
        _emit("ready", prepare_s=round(time.monotonic() - t0, 3), pid=os.getpid())
        # one heap for thousands of devices: keep the collector's full passes off it
        async with gc_policy_running(), anyio.create_task_group() as tg:
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                command = line.strip()
                if command == "go":
                    tg.start_soon(self.ramp, int(self.cfg.get("concurrency", 200)))
                elif command == "status":
                    _emit(
                        "status",
                        alive=self.alive(),
                        lost=self.lost,
                        connected=len(self.ready_times),
                        gave_up=self.gave_up,
                    )
                elif command == "stop" or not line:
                    if self.stop_event is not None:
                        self.stop_event.set()
                    break
        _emit("stopped", lost=self.lost)


def main() -> int:
    raise_nofile_limit()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    cfg = json.loads(sys.stdin.readline())
    cpus = cfg.get("cpus")
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    fleet = Fleet(cfg)
    anyio.run(fleet.serve, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
