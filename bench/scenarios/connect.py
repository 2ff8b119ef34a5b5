"""``connect``: what holding a connected fleet costs, per device.

Every run already records the connect phase (:func:`bench.scenarios.common.run_one`): connect
rate (devices connected / seconds from ``go`` to the last one, at most ``concurrency``
connects in flight per worker), server memory per device (VmRSS of the controller, plus the
broker for MQTT, with every device connected minus before any) and server CPU per connect.
This scenario then leaves the fleet idle for ``idle_seconds`` and measures:

- idle bytes per device per hour: bytes both ways at every device's socket (UDP payloads for
  QUIC, TLS records for the TCP transports: see ``bench.transports``) during the window,
  scaled to an hour. For rest-poll this is its polling (``If-None-Match`` -> 304), for QUIC
  the keepalive pings (interval set by the controller, ``--keepalive``), for HTTP/2 the
  server's PINGs, for MQTT the client's PINGREQ (paho keepalive 60 s);
- application exchanges per device per hour (polls, pings are not counted for QUIC/H2/MQTT);
- server CPU during the window, as % of one core, and device-side memory per device.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.fleet import sample_rss_cpu
from bench.scenarios.common import Context

NAME = "connect"
DEFAULTS: dict[str, Any] = {"idle_seconds": 60.0}


async def measure(ctx: Context) -> dict[str, Any]:
    window = float(ctx.params.get("idle_seconds", 60.0))
    before = await ctx.fleet.status()
    _, cpu0 = sample_rss_cpu(ctx.server.pids())
    t0 = time.monotonic()
    print(
        f"{ctx.transport}: idle window {window:.0f} s with {ctx.agents:,} devices",
        file=__import__("sys").stderr,
        flush=True,
    )
    await asyncio.sleep(window)
    after = await ctx.fleet.status()
    rss, cpu1 = sample_rss_cpu(ctx.server.pids())
    worker_rss, _ = sample_rss_cpu(ctx.fleet.pids())
    seconds = time.monotonic() - t0
    n = max(ctx.agents, 1)
    moved = sum(after[k] - before[k] for k in ("bytes_sent", "bytes_received"))
    return {
        "idle_seconds": seconds,
        "idle_bytes": moved,
        "idle_bytes_sent": after["bytes_sent"] - before["bytes_sent"],
        "idle_bytes_received": after["bytes_received"] - before["bytes_received"],
        "idle_bytes_per_device_hour": moved / n / seconds * 3600,
        "idle_requests_per_device_hour": (after["requests"] - before["requests"])
        / n
        / seconds
        * 3600,
        "idle_server_cpu_percent": 100 * (cpu1 - cpu0) / seconds,
        "server_rss_kb": rss,
        "alive_after": after.get("alive"),
        "reconnects": after.get("connects", 0) - before.get("connects", 0),
        "worker_rss_per_device_kb": worker_rss / n,
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    c, idle = result.get("connect", {}), result.get(NAME, {})
    return {
        "connect_rate_per_s": c.get("rate_per_s"),
        "server_rss_per_device_kb": c.get("server_rss_per_device_kb"),
        "server_cpu_ms_per_connect": c.get("server_cpu_ms_per_connect"),
        "idle_bytes_per_device_hour": idle.get("idle_bytes_per_device_hour"),
        "idle_requests_per_device_hour": idle.get("idle_requests_per_device_hour"),
        "idle_server_cpu_percent": idle.get("idle_server_cpu_percent"),
        "worker_rss_per_device_kb": idle.get("worker_rss_per_device_kb"),
    }
