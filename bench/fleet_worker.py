"""One worker process of the transport bench's fleet: many simulated devices, one transport.

Every device runs the real client of its transport (``bench.transports``: QUIC, Margo REST
poll, HTTP/2 push, MQTT) against the real servers; nothing on the network is mocked. A device
connects, then loops: wait for the next desired state, verify it and keep it durably as the
agent does, with the agent's own verifier (``DesiredStateVerifier``: root metadata, signatures
of the controller and of the operators, tenant, device, rollback, expiry, every blob's digest;
then its trust state written, in a worker thread, before the device says a word of it), report
it, post ``installed`` for every deployment it names. The QUIC and TCP clients do this inside
the agent's desired-state stream handling; every other transport's device does it here
(:class:`bench.device_trust.DeviceTrust`, provisioned with the tenant's root metadata at
enrolment, as that module says). A refused update ends the session (counted as an error, its
reason kept among the failure samples). If the link breaks it reconnects with a jittered
backoff, carrying what it holds (version, ETag, blobs) into the new session.

Protocol with the orchestrator (:mod:`bench.fleet`), JSON lines: one configuration line on
stdin, ``{"ev": "ready"}`` back; then commands ``go`` (connect everyone, at most
``concurrency`` connects in flight), ``status`` (counters), ``post K`` (every device posts K
status reports back to back, for the drain and storm scenarios), ``probe I K GAP`` (device I
times K status round trips), ``stop`` (or EOF). Events
out: ``progress``, ``connected`` (every device's first-connect time), ``got`` (batched:
``[device, version, delivered_t, status_acked_t]``), ``status``, ``posted``, ``stopped``.
Times are ``time.monotonic()``, the same clock in every process on Linux.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from bench.device_trust import DeviceTrust, tenant_root_chain
from bench.report_util import raise_nofile_limit
from margo_stream.gcpolicy import gc_policy_running
from margo_stream.transport.quic_stack import DEFAULT_QUIC_STACK

CARRIED = ("_version", "_etag", "blobs")  # what a device keeps across reconnects
VERIFYING_CLIENTS = ("quic", "tcp")  # clients that run the agent's verifier themselves
FLUSH = 0.05


def device_name(index: int) -> str:
    return f"dev-{index:05d}"


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"ev": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Device:
    __slots__ = (
        "index",
        "name",
        "identity",
        "client",
        "version",
        "connects",
        "connected_at",
        "errors",
        "posted",
        "post_failures",
        "trust",
    )

    def __init__(self, index: int, identity: Path) -> None:
        self.index = index
        self.name = device_name(index)
        self.identity = identity
        self.client: Any = None
        self.version = 0
        self.connects = 0
        self.connected_at: float | None = None
        self.errors = 0
        self.posted = 0
        self.post_failures = 0
        self.trust: DeviceTrust | None = None  # its verifier (the QUIC/TCP clients have theirs)


class Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.transport: str = cfg["transport"]
        self.host: str = cfg["host"]
        self.port: int = int(cfg["port"])
        root = Path(cfg["identities"])
        self.devices = [
            Device(i, root / device_name(i))
            for i in range(int(cfg["first"]), int(cfg["first"]) + int(cfg["count"]))
        ]
        self.state_root = Path(cfg["state"])
        self.tenant: str = cfg["tenant"]
        # what a device of the other transports is provisioned with at enrolment: its tenant's
        # root metadata, from where the bench keeps it (identities: <certs>/<tenant>/devices)
        self.root_chain = (
            tenant_root_chain(root.parent.parent, self.tenant)
            if self.transport not in VERIFYING_CLIENTS
            else []
        )
        self.stopping = False
        self.connect_sem = anyio.Semaphore(int(cfg.get("concurrency", 100)))
        self.got: list[list[Any]] = []
        self.failures: list[str] = []
        self.retired = {"bytes_sent": 0, "bytes_received": 0, "requests": 0, "not_modified": 0}

    # --- clients -----------------------------------------------------------------------------------
    def make_client(self, dev: Device) -> Any:
        kind = self.transport
        if kind == "quic":
            from bench.transports.quic import QuicClient

            return QuicClient(
                dev.identity,
                self.host,
                self.port,
                state_dir=self.state_root / dev.name,
                idle_timeout=float(self.cfg.get("idle_timeout", 60.0)),
                quic_stack=self.cfg.get("quic_stack", DEFAULT_QUIC_STACK),
            )
        if kind == "tcp":
            from bench.transports.tcp import TcpCarrierClient

            return TcpCarrierClient(
                dev.identity, self.host, self.port, state_dir=self.state_root / dev.name
            )
        if kind == "rest-poll":
            from bench.transports.rest_client import RestPollClient

            return RestPollClient(
                dev.identity, self.host, self.port, interval=float(self.cfg["poll_interval"])
            )
        if kind == "h2-push":
            from bench.transports.h2_client import H2PushClient

            return H2PushClient(dev.identity, self.host, self.port)
        if kind == "mqtt":
            from bench.transports.mqtt import MqttClient

            return MqttClient(dev.identity, self.host, self.port)
        raise ValueError(f"unknown transport {kind!r}")

    def _retire(self, client: Any) -> None:
        """Fold a finished client's counters into the worker's totals."""
        if hasattr(client, "sample"):
            client.sample()
        for key in self.retired:
            self.retired[key] += getattr(client.counters, key)

    # --- one device ----------------------------------------------------------------------------------
    async def enrol(self, dev: Device) -> None:
        """The device's verifier with its tenant's root adopted (a worker thread: it writes the
        trust state); the QUIC and TCP clients make their own."""
        if dev.trust is None and self.transport not in VERIFYING_CLIENTS:
            dev.trust = await anyio.to_thread.run_sync(
                DeviceTrust,
                self.tenant,
                dev.name,
                dev.identity,
                self.state_root / dev.name,
                self.root_chain,
            )

    async def run_device(self, dev: Device, jitter: float) -> None:
        backoff = 0.5
        await anyio.sleep(jitter)
        await self.enrol(dev)
        while not self.stopping:
            client = self.make_client(dev)
            if dev.client is not None:
                for attr in CARRIED:
                    if hasattr(dev.client, attr):
                        setattr(client, attr, getattr(dev.client, attr))
                self._retire(dev.client)
            dev.client = client
            try:
                # no timeout scope around connect(): the HTTP/2 and QUIC clients enter a task
                # group there (left by close()); the QUIC client times its own handshake
                async with self.connect_sem:
                    await client.connect()
                dev.connects += 1
                if dev.connected_at is None:
                    dev.connected_at = time.monotonic()
                backoff = 0.5
                await self.serve(dev, client)
            except Exception as exc:  # noqa: BLE001 - counted, then the device reconnects
                dev.errors += 1
                if len(self.failures) < 50:
                    self.failures.append(f"{type(exc).__name__}: {exc}"[:200])
            finally:
                # not inside a cancel scope of ours: the HTTP/2 and QUIC clients leave the task
                # group their connect() entered in this task
                await client.close()
            if self.stopping:
                return
            await anyio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 8.0)

    async def serve(self, dev: Device, client: Any) -> None:
        while True:
            update = await client.next_desired()
            if update.verified is None:  # not yet checked (by the QUIC and TCP clients: it was)
                assert dev.trust is not None, "enrol() the device first"
                held = await dev.trust.hold(update, client.blobs)  # TrustError: refused
                if held is None:  # the desired state it already holds
                    continue
                update = held
            manifest = update.verified
            assert manifest is not None
            # held and verified: the figure's clock stopped after the check, for every transport
            delivered = update.held_at or time.monotonic()
            dev.version = update.version
            for entry in manifest.deployments:
                await client.post_status(
                    entry.deployment_id,
                    update.version,
                    "installed",
                    [{"name": "probe", "state": "installed"}],
                )
            self.got.append([dev.index, update.version, delivered, time.monotonic()])

    async def post_burst(self, dev: Device, count: int) -> None:
        """``count`` status reports back to back (each waits for its acknowledgement)."""
        for n in range(count):
            client = dev.client
            try:
                await client.post_status(
                    "bench-telemetry",
                    max(dev.version, 1) + n,
                    "installed",
                    [{"name": "probe", "state": "installed"}],
                )
                dev.posted += 1
            except Exception:  # noqa: BLE001 - counted
                dev.post_failures += 1

    # --- the worker ------------------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        totals = dict(self.retired)
        alive = 0
        for dev in self.devices:
            client = dev.client
            if client is None:
                continue
            if hasattr(client, "sample"):
                client.sample()
            for key in totals:
                totals[key] += getattr(client.counters, key)
            alive += int(self.is_alive(dev))
        return {
            **totals,
            "alive": alive,
            "connects": sum(d.connects for d in self.devices),
            "errors": sum(d.errors for d in self.devices),
            "posted": sum(d.posted for d in self.devices),
            "post_failures": sum(d.post_failures for d in self.devices),
            "failure_samples": sorted(set(self.failures))[:5],
        }

    def is_alive(self, dev: Device) -> bool:
        client = dev.client
        if dev.connects == 0 or client is None:
            return False
        if self.transport in ("quic", "tcp"):
            return bool(client.alive)
        if self.transport == "h2-push":
            return not client.closed.is_set()
        if self.transport == "mqtt":
            return client.paho is not None and client.paho.client.is_connected()
        return client._stream is not None or not self.stopping

    async def _flush_got(self) -> None:
        while True:
            await anyio.sleep(FLUSH)
            if self.got:
                batch, self.got = self.got, []
                _emit("got", items=batch)

    async def _progress(self) -> None:
        reported = False
        while True:
            connected = sum(1 for d in self.devices if d.connected_at is not None)
            _emit(
                "progress",
                connected=connected,
                gave_up=0,
                failures=sum(d.errors for d in self.devices),
            )
            if not reported and connected == len(self.devices):
                reported = True
                _emit("connected", times=[d.connected_at for d in self.devices])
            await anyio.sleep(0.25)

    async def serve_commands(self) -> None:
        _emit("ready", pid=os.getpid())
        # one heap for thousands of devices: keep the collector's full passes off it
        async with gc_policy_running(), anyio.create_task_group() as tg:
            tg.start_soon(self._flush_got)
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                words = line.split()
                command = words[0] if words else ""
                if command == "go":
                    spread = float(self.cfg.get("spread", 0.0))
                    for dev in self.devices:
                        tg.start_soon(self.run_device, dev, random.random() * spread)
                    tg.start_soon(self._progress)
                elif command == "status":
                    _emit("status", **self.counters())
                elif command == "post":
                    tg.start_soon(self._posts, int(words[1]))
                elif command == "probe":
                    tg.start_soon(self._probe, int(words[1]), int(words[2]), float(words[3]))
                elif command == "stop" or not line:
                    break
            self.stopping = True
            tg.cancel_scope.cancel()
        _emit("stopped", **{k: v for k, v in self.counters().items() if k != "failure_samples"})

    async def _probe(self, index: int, count: int, gap: float) -> None:
        """Interactive round trips on one device's live session: ``count`` status reports,
        ``gap`` seconds apart, each timed until the controller acknowledged it."""
        dev = next(d for d in self.devices if d.index == index)
        rtts: list[float | None] = []
        for n in range(count):
            t0 = time.monotonic()
            try:
                with anyio.fail_after(60):
                    await dev.client.post_status(
                        "bench-interactive",
                        n + 1,
                        "installing",
                        [{"name": "probe", "state": "installing"}],
                    )
                rtts.append(time.monotonic() - t0)
            except Exception:  # noqa: BLE001 - a lost probe is reported as None
                rtts.append(None)
            await anyio.sleep(max(0.0, gap - (time.monotonic() - t0)))
        _emit("probe", rtts=rtts)

    async def _posts(self, count: int) -> None:
        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            for dev in self.devices:
                tg.start_soon(self.post_burst, dev, count)
        _emit(
            "posted",
            seconds=time.monotonic() - t0,
            posted=sum(d.posted for d in self.devices),
            failures=sum(d.post_failures for d in self.devices),
        )


def main(worker_class: type[Worker] = Worker) -> int:
    """A worker process: its configuration line from stdin, then commands until ``stop``."""
    raise_nofile_limit()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    cfg = json.loads(sys.stdin.readline())
    if cfg.get("cpus"):
        os.sched_setaffinity(0, set(cfg["cpus"]))
    worker = worker_class(cfg)
    anyio.run(worker.serve_commands, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
