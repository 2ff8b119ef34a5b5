"""What every transport scenario shares: bring up one transport's servers and fleet, connect
every device, hand over to the scenario's ``measure``, tear everything down.

A scenario module defines ``NAME``, ``DEFAULTS`` (its parameters), ``measure(ctx) -> dict``
and ``summary(result) -> dict`` (the headline figures of one run). :func:`run_one` adds what
every run records: connect time and rate, server memory and CPU per device, the machine load
(``os.getloadavg()``) before and after, the transport and the parameters.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.fleet import TENANT, Fleet, ServerSide, operator_token, prepare_pki, sample_rss_cpu
from bench.fleet_worker import device_name
from bench.operator_client import OperatorClient
from bench.pushlat import document
from bench.report_util import downsample, percentile, udp_counters
from bench.signing import Signer
from margo_stream.state.digest import sha256_digest
from margo_stream.transport.quic_stack import DEFAULT_QUIC_STACK, QUIC_STACKS, QuicStack

MQTT_PER_PROC = 250  # paho client: its socket and a wake-up socket pair per device


@dataclass
class Context:
    transport: str
    params: dict[str, Any]
    work: Path
    server: ServerSide
    fleet: Fleet
    token: str
    signer: Signer
    extra: dict[str, Any] = field(default_factory=dict)
    operator: OperatorClient | None = None  # the applies' connection, kept open

    @property
    def agents(self) -> int:
        return int(self.params["agents"])

    def devices(self) -> list[str]:
        return [device_name(i) for i in range(self.agents)]

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.server.api, timeout=120, headers={"Authorization": f"Bearer {self.token}"}
        )


def quic_stack_param(params: dict[str, Any]) -> QuicStack:
    """``--set quic_stack=``: the QUIC devices' stack, as the agent's ``--quic-stack``."""
    value = str(params.get("quic_stack", DEFAULT_QUIC_STACK))
    for stack in QUIC_STACKS:
        if value == stack:
            return stack
    raise ValueError(f"--set quic_stack={value!r}: the stacks are {', '.join(QUIC_STACKS)}")


async def apply(
    ctx: Context, devices: list[str], value: Any, *, blob: bytes | None = None
) -> float:
    """The operator's apply (one parameter changed, and with ``blob`` one file of the
    deployment replaced) to ``devices``; returns the monotonic time the request was sent."""
    text = document(value)
    fields: dict[str, Any] = {"devices": devices}
    if blob is not None:
        text += f"  files:\n    - {{name: bulk.bin, digest: '{sha256_digest(blob)}'}}\n"
        fields["blobs"] = [base64.b64encode(blob).decode()]
    body = ctx.signer.body([text], **fields)
    # one operator connection for every apply of the run, as a fleet manager keeps its own,
    # written with little in between (bench.operator_client: why): the figures time the
    # control plane, not a TCP connect or an HTTP library per request
    if ctx.operator is None:
        ctx.operator = OperatorClient(ctx.server.api, ctx.token)
    t0 = time.monotonic()
    await ctx.operator.post_json("/api/v1/deployments", body)
    ctx.extra["apply_seconds"] = time.monotonic() - t0  # until the controller answered
    return t0


async def wait_registered(ctx: Context, timeout: float) -> int:
    """Wait until the controller's store knows every device (rest-poll and h2 devices register
    with their capabilities, MQTT ones through the bridge); returns how many it lists."""
    deadline = time.monotonic() + timeout
    listed = 0
    async with ctx.client() as client:
        while time.monotonic() < deadline:
            r = await client.get("/api/v1/devices")
            r.raise_for_status()
            listed = sum(1 for d in r.json()["items"] if d["id"].startswith("dev-"))
            if listed >= ctx.agents:
                break
            await asyncio.sleep(0.25)
    return listed


async def fan_out(ctx: Context, value: Any, timeout: float) -> dict[str, Any]:
    """Apply to every device at once; seconds until each device held it (its curve)."""
    fleet = ctx.fleet
    start = len(fleet.got)
    udp0 = udp_counters()
    _, server_cpu0 = sample_rss_cpu(ctx.server.pids())
    _, fleet_cpu0 = sample_rss_cpu(fleet.pids())
    t0 = await apply(ctx, ctx.devices(), value)
    waiting = set(range(ctx.agents))
    deadline = time.monotonic() + timeout
    seen = start
    times: list[float] = []
    acked: list[float] = []
    lags: list[float] = []  # per device: verified -> its `installed` status acknowledged
    while waiting and time.monotonic() < deadline:
        for item in fleet.got[seen:]:
            if item[0] in waiting and item[2] > t0:
                waiting.discard(item[0])
                times.append(item[2] - t0)
                acked.append(item[3] - t0)
                lags.append(item[3] - item[2])
        seen = len(fleet.got)
        if waiting:
            await asyncio.sleep(0.05)
    # CPU until the last status was back (what the fan-out cost each side), per device pushed
    _, server_cpu1 = sample_rss_cpu(ctx.server.pids())
    _, fleet_cpu1 = sample_rss_cpu(fleet.pids())
    times.sort()
    acked.sort()
    udp1 = udp_counters()
    udp = {k: udp1[k] - udp0[k] for k in ("InDatagrams", "RcvbufErrors") if k in udp0 and k in udp1}
    return {
        "devices": ctx.agents,
        "delivered": len(times),
        "missing": len(waiting),
        "seconds": times[-1] if times and not waiting else None,
        "status_all_seconds": acked[-1] if acked and not waiting else None,
        "p50_s": percentile(times, 0.5) if times else None,
        "status_p50_s": percentile(acked, 0.5) if acked else None,
        "apply_request_s": ctx.extra.get("apply_seconds"),
        "install_lag_ms": latency_summary(lags),
        "server_cpu_ms_per_device": 1000 * (server_cpu1 - server_cpu0) / max(len(times), 1),
        "devices_cpu_ms_per_device": 1000 * (fleet_cpu1 - fleet_cpu0) / max(len(times), 1),
        # every socket on this machine, so both ends: datagrams delivered (per device, the
        # packets one push and its status exchange take) and dropped (receive buffer full)
        "udp_datagrams": udp.get("InDatagrams"),
        "udp_receive_drops": udp.get("RcvbufErrors"),
        "curve": downsample_curve(times),
        "status_curve": downsample_curve(acked),
    }


def downsample_curve(times: list[float], limit: int = 200) -> list[list[float]]:
    """[[seconds, devices holding it], ...] with at most ``limit`` points."""
    return [
        [round(t, 4), n] for t, n in downsample([(t, i + 1) for i, t in enumerate(times)], limit)
    ]


def latency_summary(values_s: list[float]) -> dict[str, Any]:
    ms = sorted(v * 1000 for v in values_s)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50": percentile(ms, 0.5),
        "p90": percentile(ms, 0.9),
        "p99": percentile(ms, 0.99),
        "max": ms[-1],
        "mean": sum(ms) / len(ms),
    }


async def run_one(
    scenario: Any, transport: str, params: dict[str, Any], work: Path, tag: str
) -> dict[str, Any]:
    """One run of ``scenario`` over ``transport``: everything started fresh and stopped."""
    agents = int(params["agents"])
    load_before = os.getloadavg()
    identities = await asyncio.to_thread(prepare_pki, work, agents)
    impairment = getattr(scenario, "impairment", lambda _p: None)(params)
    server = ServerSide(
        transport,
        work,
        tag,
        keepalive=float(params.get("keepalive", 20.0)),
        impairment=impairment,
        congestion=params.get("congestion"),  # --set congestion=reno: the controller's QUIC
        link=params.get("link"),  # --set link=tun: real packet loss (bench.relay_tun)
    )
    procs = int(params.get("procs", 1))
    if transport == "mqtt":  # paho's network loop uses select(): every fd must stay below 1024
        procs = max(procs, -(-agents // MQTT_PER_PROC))
    fleet = Fleet(
        transport,
        identities,
        work,
        tag,
        agents,
        procs,
        poll_interval=float(params.get("poll_interval", 15.0)),
        concurrency=int(params.get("concurrency", 100)),
        pin=bool(int(params.get("pin", 1))),
        quic_stack=quic_stack_param(params),
    )
    signer = Signer.for_tenant(work / "certs", TENANT)
    ctx = Context(transport, params, work, server, fleet, operator_token(work), signer)
    result: dict[str, Any] = {"transport": transport, "tag": tag, "procs": fleet.procs}
    try:
        await server.start()
        rss0, cpu0 = sample_rss_cpu(server.pids())
        await fleet.start(*server.device_addr)
        t0 = time.monotonic()
        times = await fleet.connect_all(float(params.get("connect_timeout", 60 + agents / 20)))
        listed = await wait_registered(ctx, 60)
        await asyncio.sleep(float(params.get("settle", 1.0)))
        rss1, cpu1 = sample_rss_cpu(server.pids())
        result["connect"] = {
            "connected": len(times),
            "registered": listed,
            "seconds": times[-1] if times else None,
            "rate_per_s": len(times) / times[-1] if times and times[-1] > 0 else None,
            "server_rss_before_kb": rss0,
            "server_rss_connected_kb": rss1,
            "server_rss_per_device_kb": (rss1 - rss0) / max(len(times), 1),
            "server_cpu_ms_per_connect": 1000 * (cpu1 - cpu0) / max(len(times), 1),
            "wall_s": time.monotonic() - t0,
            "curve": downsample_curve(times),
        }
        # (the connect scenario adds its idle figures to the connect phase's)
        result.setdefault(scenario.NAME, {}).update(await scenario.measure(ctx))
        result["fleet"] = await fleet.status()
    finally:
        if ctx.operator is not None:
            await ctx.operator.close()
        await fleet.stop()
        await server.stop()
        if server.relay_stats is not None:
            result["relay"] = server.relay_stats
    result["load"] = {"before": load_before, "after": os.getloadavg()}
    result["summary"] = scenario.summary(result)
    return result
