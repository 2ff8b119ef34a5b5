"""``drain``: how long a fleet of devices takes to hand the controller the telemetry each
buffered while it was away.

QUIC only carries telemetry in this bench (``bench.scenarios.storm`` explains how: real
batches pre-encoded by ``bench.ingest_worker.make_batches``, sent on a telemetry stream of each
device's own session, acked by the controller once stored). Every device connected, the
controller is stopped (SIGTERM: it closes its connections, the devices see it at once and
start reconnecting with their backoff), each device then queues ``backlog`` records it cannot
send, and the controller is started again on the same ports and store. Measured:

- **drain time**: from the controller ready until the last device's last record was acked
  (stored), and per device from its reconnect to its last ack (p50, p100);
- **rate**: all records over the time from the controller ready to the last ack;
- **lost**: records produced minus the distinct records the store holds (must be 0).

For rest-poll, HTTP/2 and MQTT the row says ``n/a (no telemetry path)``: their bench devices
have none (Margo's REST API has no telemetry upload; the h2 and MQTT clients here carry
desired state and status only), and nothing is run for them beyond the common connect phase.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from bench.report_util import percentile
from bench.scenarios.storm import (
    NO_TELEMETRY,
    TelemetryFleet,
    stored_counts,
    swap_fleet,
    telemetry_loss,
    telemetry_params,
)

NAME = "drain"
DEFAULTS: dict[str, Any] = {
    "backlog": 1000,
    "record_bytes": 200,
    "batch": 50,
    "in_flight": 4,
    "back_timeout": 180.0,
    "settle": 1.0,
}


async def measure(ctx: Any) -> dict[str, Any]:
    p = ctx.params
    if ctx.transport != "quic":
        return {"telemetry": NO_TELEMETRY}
    backlog = int(p["backlog"])
    swap = await swap_fleet(ctx, telemetry_params(ctx, backlog))
    fleet: TelemetryFleet = ctx.fleet
    out: dict[str, Any] = {"reconnected_fleet": swap, "backlog_per_device": backlog}
    try:
        await asyncio.sleep(float(p.get("settle", 1.0)))
        t_stop = time.monotonic()
        await asyncio.to_thread(ctx.server.stop_controller)
        for worker in fleet.workers:  # each device buffers its backlog while the link is down
            await worker.send(f"post {backlog}")
        await asyncio.sleep(0.5)
        await asyncio.to_thread(ctx.server._start_controller)
        t_ready = time.monotonic()
        out["controller_down_s"] = t_ready - t_stop
        print(
            f"quic: controller back after {t_ready - t_stop:.2f} s; {ctx.agents} devices drain "
            f"{backlog} records each",
            file=sys.stderr,
            flush=True,
        )
        replies = [await w.wait("posted", float(p["back_timeout"]) + 600) for w in fleet.workers]
        devices = await fleet.devices()
        done = [d[4] for d in devices if d[4] is not None]
        last = max(done) if done else None
        per_device = sorted(
            d[4] - min([t for t in d[1] if t > t_stop] or [t_ready])
            for d in devices
            if d[4] is not None
        )
        total = sum(d[3] for d in devices)
        out["drain"] = {
            "devices": ctx.agents,
            "drained": len(done),
            "posted": sum(r["posted"] for r in replies),
            "failures": sum(r["failures"] for r in replies),
            "seconds_from_ready": last - t_ready if last else None,
            "records_per_s": total / (last - t_ready) if last and last > t_ready else None,
            "per_device_p50_s": percentile(per_device, 0.5) if per_device else None,
            "per_device_p100_s": per_device[-1] if per_device else None,
        }
        out["telemetry"] = telemetry_loss(
            devices, await asyncio.to_thread(stored_counts, ctx.server.data)
        )
        out["fleet_after"] = await fleet.status()
    finally:
        await fleet.stop()
    return out


def summary(result: dict[str, Any]) -> dict[str, Any]:
    r = result.get(NAME, {})
    tele = r.get("telemetry")
    if not isinstance(tele, dict):
        return {"telemetry_note": tele}
    d = r.get("drain", {})
    return {
        "drain_s": d.get("seconds_from_ready"),
        "drain_per_s": d.get("records_per_s"),
        "drain_device_p50_s": d.get("per_device_p50_s"),
        "drain_device_p100_s": d.get("per_device_p100_s"),
        "devices_drained": d.get("drained"),
        "drain_failures": d.get("failures"),
        "telemetry_not_stored": tele.get("not_stored"),
    }
