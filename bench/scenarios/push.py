"""``push``: how fast a desired-state change reaches devices, one device and the whole fleet.

With every device connected (and idle):

1. **fan-out**: one operator apply naming every device; for each device, the seconds from the
   request leaving the operator to the device holding the new, verified desired state. The
   curve (devices holding it over time) and its end (fan-out time) are reported, and when the
   last device's ``installed`` status was acknowledged.
2. **push latency**: ``samples`` applies, each to one device picked at random (each device at
   most once), started ``gap`` seconds apart and allowed to overlap (a 15 s poll would
   otherwise take minutes): latency = request sent -> that device verified it; status round
   trip = request sent -> the device's ``installed`` status acknowledged by the controller.

The same clock (``time.monotonic()``) is read by the bench and by the device processes.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from bench.scenarios.common import Context, apply, fan_out, latency_summary

NAME = "push"
DEFAULTS: dict[str, Any] = {"samples": 40, "gap": 0.25, "fanouts": 1}


async def one_sample(
    ctx: Context, index: int, value: str, timeout: float
) -> tuple[float, float] | None:
    t0 = await apply(ctx, [ctx.devices()[index]], value)
    item = await ctx.fleet.wait_got(lambda it: it[0] == index and it[2] > t0, timeout)
    if item is None:
        return None
    return item[2] - t0, item[3] - t0


async def measure(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    timeout = float(p.get("poll_interval", 15.0)) * 2 + 30 + ctx.agents / 50
    fanouts = [
        await fan_out(ctx, f"fan-{k}-{time.time_ns()}", timeout)
        for k in range(int(p.get("fanouts", 1)))
    ]
    rng = random.Random(int(p.get("seed", 1)))
    picks = rng.sample(range(ctx.agents), min(int(p.get("samples", 40)), ctx.agents))
    tasks = []
    for n, index in enumerate(picks):
        tasks.append(
            asyncio.ensure_future(one_sample(ctx, index, f"s{n}-{time.time_ns()}", timeout))
        )
        await asyncio.sleep(float(p.get("gap", 0.25)))
    results = await asyncio.gather(*tasks)
    got = [r for r in results if r is not None]
    return {
        "fanout": fanouts,
        "latency_ms": latency_summary([r[0] for r in got]),
        "status_rtt_ms": latency_summary([r[1] for r in got]),
        "latencies_s": [round(r[0], 6) for r in got],
        "lost_samples": len(results) - len(got),
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    push = result.get(NAME, {})
    fan = push.get("fanout", [{}])[0]
    lat = push.get("latency_ms", {})
    return {
        "push_p50_ms": lat.get("p50"),
        "push_p99_ms": lat.get("p99"),
        "status_rtt_p50_ms": push.get("status_rtt_ms", {}).get("p50"),
        "fanout_s": fan.get("seconds"),
        "fanout_status_s": fan.get("status_all_seconds"),
        "fanout_missing": fan.get("missing"),
        "fanout_server_cpu_ms_per_device": fan.get("server_cpu_ms_per_device"),
        "fanout_devices_cpu_ms_per_device": fan.get("devices_cpu_ms_per_device"),
        "connect_rate_per_s": result.get("connect", {}).get("rate_per_s"),
        "server_rss_per_device_kb": result.get("connect", {}).get("server_rss_per_device_kb"),
    }
