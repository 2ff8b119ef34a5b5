"""``storm``: every device connected, then the controller is killed (``kill -9``) and started
again on the same ports with the same store. How long until the fleet is back, and (QUIC) was
any telemetry lost?

Measured per transport:

- **restart**: seconds from the kill until the new controller is ready (its ready file).
- **reconnect time** per device, from the kill (the restart is included; a device can be
  back before the bench has seen the new controller's ready file): QUIC, HTTP/2,
  MQTT: the device's next successful connect (for QUIC: handshake, hello answered, status
  stream open); rest-poll: the device's next successful poll (its keep-alive connection is
  reopened inside the request, so a poll is what tells it is back). p50 and p100 over the
  fleet, and how many devices came back within ``back_timeout``.
- **telemetry lost** (QUIC only; no other transport in this bench has a telemetry path): every
  QUIC device first sends ``before`` telemetry records, acked by the controller once stored;
  then ``during`` more are queued on each device just before the kill, so batches are in
  flight or buffered on the device when the controller dies. Each device keeps every record
  the controller has not acked (as the agent's buffer does) and, once reconnected, sends
  again from its oldest unacknowledged batch on a new telemetry stream (the controller
  deduplicates by sequence number). Lost = records a device holds no more (acked) or ever
  produced, minus the distinct records the store holds for it, read from the controller's
  telemetry database after the run. It must be 0.

The QUIC devices' telemetry is sent the way ``bench.ingest_worker`` does it: real batches
pre-encoded once per worker with ``margo_stream.protocol.telemetry_codec.encode_batch``
(``ingest_worker.make_batches``), at most ``in_flight`` unacknowledged per device, on a
telemetry stream of the device's own session (``QuicClient`` has no telemetry feature of its
own). For that the QUIC fleet of these scenarios runs this module's worker
(:class:`TelemetryWorker`, the fleet worker with ``post K`` meaning "K telemetry records"):
``run_one`` connects the standard fleet first (its connect figures are recorded as usual),
then :func:`swap_fleet` replaces it with this one, on the same identities and trust state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from bench.fleet import TENANT, Fleet
from bench.fleet_worker import Device, Worker, device_name
from bench.fleet_worker import main as fleet_worker_main
from bench.report_util import percentile

NAME = "storm"
DEFAULTS: dict[str, Any] = {
    "before": 200,
    "during": 200,
    "record_bytes": 200,
    "batch": 50,
    "in_flight": 4,
    "back_timeout": 180.0,
    "settle": 1.0,
}
NO_TELEMETRY = "n/a (no telemetry path)"
WORKER_MODULE = "bench.scenarios.storm"


# =========================================================================== device side


class TelemetryWorker(Worker):
    """The fleet worker, plus: every successful connect (and, for rest-poll, every successful
    poll) is timed per device, and for QUIC ``post K`` queues K telemetry records per device
    and returns once the controller acknowledged all of them, across reconnects."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.ok_times: dict[int, list[float]] = {d.index: [] for d in self.devices}
        self.produced: dict[int, int] = dict.fromkeys(self.ok_times, 0)
        self.acked: dict[int, int] = dict.fromkeys(self.ok_times, 0)
        self.done_at: dict[int, float | None] = dict.fromkeys(self.ok_times)
        self.batch = int(cfg.get("batch", 50))
        self.in_flight = int(cfg.get("in_flight", 4))
        self.batches: list[Any] = []
        if self.transport == "quic" and int(cfg.get("records", 0)) > 0:
            from bench.ingest_worker import make_batches

            self.batches = make_batches(
                int(cfg["records"]), int(cfg.get("record_bytes", 200)), self.batch
            )

    def make_client(self, dev: Device) -> Any:
        client = super().make_client(dev)
        if self.transport == "rest-poll":
            poll, times = client.poll, self.ok_times[dev.index]

            async def timed_poll() -> Any:
                update = await poll()
                times.append(time.monotonic())
                return update

            client.poll = timed_poll
        if self.transport == "h2-push":
            client.close = _h2_close(client)
        return client

    async def serve(self, dev: Device, client: Any) -> None:
        self.ok_times[dev.index].append(time.monotonic())  # connected (again)
        await super().serve(dev, client)

    def counters(self) -> dict[str, Any]:
        out = super().counters()
        out["devices"] = [
            [
                d.index,
                self.ok_times[d.index][-20:],
                self.produced[d.index],
                self.acked[d.index],
                self.done_at[d.index],
            ]
            for d in self.devices
        ]
        return out

    # --- telemetry (QUIC) -------------------------------------------------------------------------
    async def post_burst(self, dev: Device, count: int) -> None:
        if self.transport != "quic":
            await super().post_burst(dev, count)
            return
        import anyio

        i = dev.index
        records = len(self.batches) * self.batch
        target = min(records, self.produced[i] + -(-count // self.batch) * self.batch)
        self.produced[i] = target
        deadline = time.monotonic() + float(self.cfg.get("post_timeout", 600))
        while self.acked[i] < target and not self.stopping and time.monotonic() < deadline:
            client = dev.client
            # the session's hello answered (its status stream is open only then): a stream
            # opened earlier is reset by the controller
            if client is None or not client.alive or getattr(client, "_status", None) is None:
                await anyio.sleep(0.05)
                continue
            try:
                await self._send(dev, client, target)
            except Exception as exc:  # noqa: BLE001 - the session broke: sent again once reconnected
                dev.post_failures += 1
                if len(self.failures) < 50:
                    self.failures.append(f"telemetry: {type(exc).__name__}: {exc}"[:200])
                await anyio.sleep(0.05)
        if self.acked[i] >= target:
            dev.posted += count
            self.done_at[i] = time.monotonic()

    async def _send(self, dev: Device, client: Any, target: int) -> None:
        """Send every unacknowledged batch up to ``target`` on a new telemetry stream of this
        session, at most ``in_flight`` unacknowledged; returns when all are acked, raises
        when the session ends first."""
        import anyio

        from margo_stream.protocol import messages as m

        i, size = dev.index, self.batch
        stream = client.session.conn.open_stream()
        wake = anyio.Event()
        ended = False

        async def read_acks() -> None:
            nonlocal wake, ended
            try:
                while (message := await stream.receive()) is not None:
                    if isinstance(message, m.TelemetryAck) and message.seq > self.acked[i]:
                        self.acked[i] = min(message.seq, self.produced[i])
                        wake.set()
            except Exception:  # noqa: BLE001 - the stream or the connection failed
                pass
            ended = True
            wake.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_acks)
            k = self.acked[i] // size  # the batch holding the oldest unacknowledged record
            try:
                while self.acked[i] < target:
                    floor = self.acked[i] // size
                    while k * size < target and k - floor < self.in_flight:
                        stream.send(self.batches[k])
                        k += 1
                    wake = anyio.Event()
                    with anyio.move_on_after(0.5):
                        await wake.wait()
                    if ended or not client.alive:
                        raise ConnectionError("telemetry stream ended before every batch was acked")
            finally:
                tg.cancel_scope.cancel()


def _h2_close(client: Any) -> Any:
    """``H2PushClient.close`` that also survives a server gone without a word: its own lets
    ``anyio.EndOfStream`` from the final flush escape before it leaves its task group, which
    ends the whole worker process (seen on every device after ``kill -9``)."""
    import anyio

    plain = client.close

    async def close() -> None:
        tg = client._tg
        if tg is None:
            await plain()
            return
        client._tg = None
        tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                if client._conn is not None and client._writer is not None:
                    client._conn.close_connection()
                    await client._writer.flush()
            with contextlib.suppress(Exception):
                await client._tls.aclose()
        await tg.__aexit__(None, None, None)
        client._send.close()
        client._recv.close()

    return close


def worker_main() -> int:
    """``python -m bench.scenarios.storm``: one worker process of :class:`TelemetryFleet`."""
    return fleet_worker_main(TelemetryWorker)


# =========================================================================== bench side


class TelemetryFleet(Fleet):
    """:class:`bench.fleet.Fleet` whose workers run :class:`TelemetryWorker`."""

    worker_module = WORKER_MODULE

    def __init__(self, *args: Any, telemetry: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.telemetry = telemetry or {}

    def worker_extra(self) -> dict[str, Any]:
        return dict(self.telemetry)

    async def devices(self) -> list[list[Any]]:
        """``[index, recent ok times, records produced, records acked, all acked at]`` per
        device."""
        for worker in self.workers:
            await worker.send("status")
        out: list[list[Any]] = []
        for worker in self.workers:
            out.extend((await worker.wait("status", 60))["devices"])
        return sorted(out)


async def swap_fleet(ctx: Any, telemetry: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replace the connected standard fleet by a :class:`TelemetryFleet` of the same devices
    (identities, trust state) and connect it; the caller stops it (see :func:`measure`)."""
    old = ctx.fleet
    await old.stop()
    if ctx.transport == "quic" and await asyncio.to_thread(stored_counts, ctx.server.data):
        # a --work directory used before: the store already holds these devices' records, and
        # their drain would be mostly duplicates
        raise RuntimeError(f"{ctx.server.data} already holds telemetry: use a fresh --work")
    fleet = TelemetryFleet(
        ctx.transport,
        old.identities,
        ctx.work,
        old.state.name[len("state-") :],
        old.agents,
        old.procs,
        poll_interval=old.poll_interval,
        concurrency=old.concurrency,
        telemetry=telemetry,
    )
    fleet.pin = getattr(old, "pin", True)
    ctx.fleet = fleet
    await fleet.start(*ctx.server.device_addr)
    times = await fleet.connect_all(float(ctx.params.get("connect_timeout", 60 + ctx.agents / 20)))
    return {"connected": len(times), "seconds": times[-1] if times else None}


def kill_controller(server: Any) -> None:
    """``kill -9`` of the controller process (for mqtt the bridge host; the broker stays)."""
    proc = server.proc
    if proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        server.proc = None


async def restart_hard(server: Any) -> tuple[float, float]:
    """Kill -9 and start again on the same ports and store; (kill time, ready time)."""
    t_kill = time.monotonic()
    await asyncio.to_thread(kill_controller, server)
    await asyncio.to_thread(server._start_controller)
    return t_kill, time.monotonic()


async def wait_back(fleet: TelemetryFleet, since: float, timeout: float) -> dict[int, float]:
    """Seconds from ``since`` to each device's first successful connect (rest-poll: poll)
    after it, for every device back within ``timeout``."""
    deadline = time.monotonic() + timeout
    back: dict[int, float] = {}
    while time.monotonic() < deadline:
        for index, times, *_ in await fleet.devices():
            later = [t for t in times if t > since]
            if later and index not in back:
                back[index] = min(later) - since
        if len(back) >= fleet.agents:
            break
        await asyncio.sleep(0.25)
    return back


def stored_counts(data: Path) -> dict[str, int]:
    """Distinct telemetry records the controller's store holds per device."""
    counts: dict[str, int] = {}
    for path in sorted(data.glob("*.telemetry.db")):
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        ) as db:
            for device, n in db.execute(
                "SELECT device_id, COUNT(DISTINCT seq) FROM telemetry "
                "WHERE tenant = ? GROUP BY device_id",
                (TENANT,),
            ):
                counts[device] = counts.get(device, 0) + int(n)
    return counts


def telemetry_loss(devices: list[list[Any]], stored: dict[str, int]) -> dict[str, Any]:
    produced = sum(d[2] for d in devices)
    acked = sum(d[3] for d in devices)
    lost_acked = sum(max(0, d[3] - stored.get(device_name(d[0]), 0)) for d in devices)
    missing = sum(max(0, d[2] - stored.get(device_name(d[0]), 0)) for d in devices)
    return {
        "produced": produced,
        "acked": acked,
        "stored": sum(stored.values()),
        "lost": lost_acked,
        "not_stored": missing,
        "devices_losing": sum(1 for d in devices if d[3] > stored.get(device_name(d[0]), 0)),
    }


def reconnect_summary(back: dict[int, float], agents: int) -> dict[str, Any]:
    times = sorted(back.values())
    return {
        "devices": agents,
        "back": len(times),
        "missing": agents - len(times),
        "p50_s": percentile(times, 0.5) if times else None,
        "p100_s": times[-1] if times else None,
        "curve": [[round(t, 3), n + 1] for n, t in enumerate(times)][:: max(1, len(times) // 200)],
    }


def telemetry_params(ctx: Any, records: int) -> dict[str, Any]:
    p = ctx.params
    return {
        "records": records,
        "record_bytes": int(p["record_bytes"]),
        "batch": int(p["batch"]),
        "in_flight": int(p["in_flight"]),
        "post_timeout": float(p["back_timeout"]) + 600,
    }


async def measure(ctx: Any) -> dict[str, Any]:
    p = ctx.params
    quic = ctx.transport == "quic"
    before, during = int(p["before"]), int(p["during"])
    swap = await swap_fleet(ctx, telemetry_params(ctx, before + during) if quic else None)
    fleet: TelemetryFleet = ctx.fleet
    out: dict[str, Any] = {"reconnected_fleet": swap}
    try:
        await asyncio.sleep(float(p.get("settle", 1.0)))
        if quic:
            out["telemetry_before"] = await fleet.post(before, float(p["back_timeout"]) + 300)
            for worker in fleet.workers:  # batches in flight when the controller dies
                await worker.send(f"post {during}")
            await asyncio.sleep(0.05)
        t_kill, t_ready = await restart_hard(ctx.server)
        out["restart_s"] = t_ready - t_kill
        print(
            f"{ctx.transport}: controller killed and back in {t_ready - t_kill:.2f} s; "
            f"waiting for {ctx.agents} devices",
            file=sys.stderr,
            flush=True,
        )
        if ctx.transport == "mqtt":
            # the devices' sessions are with the broker, which keeps running: none reconnects
            await asyncio.sleep(float(p.get("settle", 1.0)))
            status = await fleet.status()
            out["reconnect"] = {
                "devices": ctx.agents,
                "back": int(status.get("alive", 0)),
                "note": "broker sessions survive a controller restart",
            }
        else:
            # from the kill: a fast device may be back before the bench saw the ready file
            back = await wait_back(fleet, t_kill, float(p["back_timeout"]))
            out["reconnect"] = reconnect_summary(back, ctx.agents)
            out["reconnect_from_ready_p100_s"] = (
                max(back.values()) - (t_ready - t_kill) if back else None
            )
        if quic:
            replies = [
                await w.wait("posted", float(p["back_timeout"]) + 600) for w in fleet.workers
            ]
            out["telemetry_after"] = {
                "seconds_from_ready": time.monotonic() - t_ready,
                "posted": sum(r["posted"] for r in replies),
                "failures": sum(r["failures"] for r in replies),
            }
            devices = await fleet.devices()
            out["telemetry"] = telemetry_loss(
                devices, await asyncio.to_thread(stored_counts, ctx.server.data)
            )
        else:
            out["telemetry"] = NO_TELEMETRY
        out["fleet_after"] = {k: v for k, v in (await fleet.status()).items()}
    finally:
        await fleet.stop()
    return out


def summary(result: dict[str, Any]) -> dict[str, Any]:
    r = result.get(NAME, {})
    rc = r.get("reconnect", {})
    tele = r.get("telemetry")
    out = {
        "restart_s": r.get("restart_s"),
        "reconnect_p50_s": rc.get("p50_s"),
        "reconnect_p100_s": rc.get("p100_s"),
        "devices_back": rc.get("back"),
    }
    if isinstance(tele, dict):
        out.update(
            telemetry_lost=tele.get("lost"),
            telemetry_not_stored=tele.get("not_stored"),
            telemetry_acked=tele.get("acked"),
        )
    else:
        out["telemetry_note"] = tele
    return out


if __name__ == "__main__":
    raise SystemExit(worker_main())
