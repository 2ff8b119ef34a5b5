"""``lossy``: a bad link between the devices and the servers, the same for every transport.

Every device reaches its server through one seeded userspace relay (:mod:`bench.relay`: UDP
for QUIC, TCP for the others) with ``loss`` (default 2 %; run again with ``--set loss=0.1``)
and ``delay_ms`` (50 ms each way). The TCP relay turns a loss into what TCP would make of it
(a retransmission timeout during which everything behind the lost segment waits), the UDP
relay drops the datagram. Then:

1. **push latency under loss**: ``samples`` single-device applies, as in ``push``.
2. **interactive latency under bulk traffic**: the operator keeps device 0 busy with bulk
   downloads (each apply replaces a ``bulk_bytes`` file of its deployment, the next one as soon
   as the device verified the last), and on that same device and session ``probes`` status
   round trips are timed, ``probe_gap`` seconds apart (QUIC: a status stream beside the
   desired-state streams; HTTP/2: a request stream beside the push stream, one TCP
   connection; REST: the same keep-alive connection, one request at a time; MQTT: a QoS 1
   publish and its PUBACK on the broker connection that delivers the bulk). A probe not
   answered within 60 s counts as lost.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from bench.scenarios.common import Context, apply, latency_summary
from bench.scenarios.push import one_sample

NAME = "lossy"
DEFAULTS: dict[str, Any] = {
    "loss": 0.02,
    "delay_ms": 50.0,
    "jitter_ms": 0.0,
    "seed": 1,
    "samples": 20,
    "gap": 0.5,
    "bulk_bytes": 512 * 1024,
    "probes": 40,
    "probe_gap": 0.25,
}


def impairment(params: dict[str, Any]) -> dict[str, Any]:
    return {k: params[k] for k in ("loss", "delay_ms", "jitter_ms", "seed")}


def got_by_device0_after(t0: float) -> Callable[[list[Any]], bool]:
    """The fleet's ``got`` items of device 0 delivered after ``t0``."""
    return lambda it: it[0] == 0 and it[2] > t0


async def bulk(ctx: Context, stop: asyncio.Event, size: int, moved: list[int]) -> None:
    """Back-to-back bulk downloads to device 0 until ``stop``."""
    n = 0
    while not stop.is_set():
        n += 1
        t0 = await apply(
            ctx, [ctx.devices()[0]], f"bulk-{n}-{time.time_ns()}", blob=os.urandom(size)
        )
        item = await ctx.fleet.wait_got(got_by_device0_after(t0), 120)
        if item is not None:
            moved.append(size)


async def measure(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    timeout = float(p.get("poll_interval", 15.0)) * 2 + 60
    picks = list(range(1, ctx.agents)) or [0]
    tasks = []
    for n in range(int(p["samples"])):
        index = picks[n % len(picks)]
        tasks.append(
            asyncio.ensure_future(one_sample(ctx, index, f"l{n}-{time.time_ns()}", timeout))
        )
        await asyncio.sleep(float(p["gap"]))
    pushes = [r for r in await asyncio.gather(*tasks) if r is not None]

    stop = asyncio.Event()
    moved: list[int] = []
    t0 = time.monotonic()
    loader = asyncio.ensure_future(bulk(ctx, stop, int(p["bulk_bytes"]), moved))
    await asyncio.sleep(1.0)  # the first bulk download is under way
    rtts = await ctx.fleet.probe(0, int(p["probes"]), float(p["probe_gap"]))
    stop.set()
    seconds = time.monotonic() - t0
    try:
        await asyncio.wait_for(loader, 120)
    except TimeoutError:
        pass
    answered = [r for r in rtts if r is not None]
    return {
        "impairment": impairment(p),
        "push_ms": latency_summary([r[0] for r in pushes]),
        "lost_push_samples": int(p["samples"]) - len(pushes),
        "interactive_ms": latency_summary(answered),
        "interactive_s": answered,
        "interactive_lost": len(rtts) - len(answered),
        "bulk_downloads": len(moved),
        "bulk_seconds": seconds,
        "bulk_mbit_s": 8 * sum(moved) / seconds / 1e6,
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    r = result.get(NAME, {})
    return {
        "lossy_push_p50_ms": r.get("push_ms", {}).get("p50"),
        "lossy_push_p99_ms": r.get("push_ms", {}).get("p99"),
        "interactive_p50_ms": r.get("interactive_ms", {}).get("p50"),
        "interactive_p99_ms": r.get("interactive_ms", {}).get("p99"),
        "bulk_mbit_s": r.get("bulk_mbit_s"),
    }
