"""Retention: telemetry by age and by size per tenant, events and terminal audits by age.

Theory of operation
-------------------
One task (``run_retention``) wakes shortly after the controller starts and then every
``interval`` seconds, and makes one pass (``retention_pass``):

1. telemetry received before ``now - telemetry_age`` (every tenant);
2. per tenant whose payloads take more than ``telemetry_max_bytes``: its oldest records until
   it fits (the store keeps each tenant's byte count, so finding who is over is one read);
3. telemetry gaps older than the telemetry age that the device's watermark has passed;
4. events older than ``event_age``;
5. terminal session audits that ended before ``now - audit_age``.

Every store call deletes at most ``batch`` rows in its own transaction and the task yields
between calls, so a backlog (the first pass after an upgrade, a lowered cap) is worked off in
small steps: telemetry ingest, which shares the telemetry database's thread, and the control
plane, which shares the main one, wait for one batch at most, never for the whole pass. A pass
that deleted something logs one line (``event=retention-pruned``) with what it deleted.

The interval is 60 s; the environment variable ``MARGO_RETENTION_INTERVAL`` (a duration:
``500ms``, ``2s``, ``5m``) overrides it, for tests and for operators who want a tighter cap.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from controller.config import ControllerConfig
from margo_stream.errors import StoreError
from margo_stream.identity.bootstrap import parse_duration

log = logging.getLogger("margo.controller.retention")

INTERVAL_ENV = "MARGO_RETENTION_INTERVAL"
DEFAULT_INTERVAL = 60.0
FIRST_PASS_DELAY = 5.0  # after start (or the interval, when shorter)
DEFAULT_BATCH = 2000  # rows per transaction


class RetentionStore(Protocol):
    """What retention needs of the store (``SqliteStore`` has it: ``SqliteRetention``). Every
    ``prune_*`` deletes at most ``limit`` rows in one transaction, oldest first."""

    async def telemetry_usage(self) -> dict[str, int]:
        """Payload bytes of each tenant's stored telemetry."""
        ...

    async def prune_telemetry_before(
        self, before: float, *, limit: int, tenant: str | None = None
    ) -> tuple[int, int]:
        """Records received before ``before``: ``(records, bytes)`` deleted."""
        ...

    async def prune_telemetry_over(
        self, tenant: str, max_bytes: int, *, limit: int
    ) -> tuple[int, int]:
        """The tenant's oldest records while it holds more than ``max_bytes``."""
        ...

    async def prune_telemetry_gaps(self, before: float, *, limit: int) -> int: ...

    async def prune_events(self, before: float, *, limit: int) -> int: ...

    async def prune_session_audits(self, before: float, *, limit: int) -> int:
        """Audits of terminal sessions that ended before ``before`` (open ones are kept)."""
        ...


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    telemetry_age: float  # seconds
    telemetry_max_bytes: int  # per tenant
    event_age: float
    audit_age: float
    batch: int = DEFAULT_BATCH

    def __post_init__(self) -> None:
        for name in ("telemetry_age", "telemetry_max_bytes", "event_age", "audit_age", "batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"retention {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config: ControllerConfig) -> RetentionPolicy:
        return cls(
            telemetry_age=config.telemetry_retention,
            telemetry_max_bytes=config.telemetry_max_bytes,
            event_age=config.event_retention,
            audit_age=config.audit_retention,
        )


@dataclass(slots=True)
class PassReport:
    """What one pass deleted."""

    telemetry_records: int = 0  # by age
    telemetry_bytes: int = 0
    over_cap: dict[str, tuple[int, int]] = field(default_factory=dict)  # tenant: (records, bytes)
    gaps: int = 0
    events: int = 0
    audits: int = 0
    batches: int = 0  # store transactions that deleted (or looked for) rows
    largest_batch: int = 0
    seconds: float = 0.0

    @property
    def deleted(self) -> int:
        capped = sum(n for n, _ in self.over_cap.values())
        return self.telemetry_records + capped + self.gaps + self.events + self.audits

    def _count(self, rows: int) -> None:
        self.batches += 1
        self.largest_batch = max(self.largest_batch, rows)


async def _drain(report: PassReport, batch: int, call: Callable[[], Awaitable[int]]) -> int:
    """Call ``call`` (one batch) until it deletes fewer than ``batch`` rows; the total."""
    total = 0
    while True:
        n = await call()
        report._count(n)
        total += n
        if n < batch:
            return total
        await anyio.sleep(0)  # let whatever queued behind this batch run first


async def retention_pass(
    store: RetentionStore, policy: RetentionPolicy, *, now: float
) -> PassReport:
    report = PassReport()
    started = time.perf_counter()
    batch = policy.batch
    freed = 0

    async def by_age() -> int:
        nonlocal freed
        n, b = await store.prune_telemetry_before(now - policy.telemetry_age, limit=batch)
        freed += b
        return n

    report.telemetry_records = await _drain(report, batch, by_age)
    report.telemetry_bytes = freed
    for tenant, used in (await store.telemetry_usage()).items():
        if used <= policy.telemetry_max_bytes:
            continue
        capped = 0

        async def over_cap(tenant: str = tenant) -> int:
            nonlocal capped
            n, b = await store.prune_telemetry_over(tenant, policy.telemetry_max_bytes, limit=batch)
            capped += b
            return n

        records = await _drain(report, batch, over_cap)
        if records:
            report.over_cap[tenant] = (records, capped)
    before = now - policy.telemetry_age
    report.gaps = await _drain(
        report, batch, lambda: store.prune_telemetry_gaps(before, limit=batch)
    )
    events_before = now - policy.event_age
    report.events = await _drain(
        report, batch, lambda: store.prune_events(events_before, limit=batch)
    )
    audits_before = now - policy.audit_age
    report.audits = await _drain(
        report, batch, lambda: store.prune_session_audits(audits_before, limit=batch)
    )
    report.seconds = time.perf_counter() - started
    return report


def interval_from_env(default: float = DEFAULT_INTERVAL) -> float:
    """``MARGO_RETENTION_INTERVAL`` when set (``ConfigError`` for a bad value), else ``default``."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return default
    return parse_duration(raw, what=INTERVAL_ENV)


def _log(report: PassReport) -> None:
    capped = sum(n for n, _ in report.over_cap.values())
    log.info(
        "retention deleted %d telemetry records (%d by age, %d over a tenant's cap), "
        "%d events, %d terminal audits",
        report.telemetry_records + capped,
        report.telemetry_records,
        capped,
        report.events,
        report.audits,
        extra={
            "event": "retention-pruned",
            "telemetry_records": report.telemetry_records,
            "telemetry_bytes": report.telemetry_bytes,
            "over_cap": {t: {"records": n, "bytes": b} for t, (n, b) in report.over_cap.items()},
            "gaps": report.gaps,
            "events": report.events,
            "audits": report.audits,
            "batches": report.batches,
            "seconds": round(report.seconds, 3),
        },
    )


async def run_retention(
    store: RetentionStore,
    policy: RetentionPolicy,
    *,
    interval: float | None = None,
    first_delay: float | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Enforce ``policy`` until cancelled: a pass ``first_delay`` after start (default: 5 s or
    the interval, when shorter), then every ``interval`` seconds (default: 60 s, or
    ``MARGO_RETENTION_INTERVAL``). A failing pass is logged and retried at the next interval."""
    every = interval if interval is not None else interval_from_env()
    if every <= 0:
        raise ValueError(f"retention interval must be positive, got {every}")
    await anyio.sleep(first_delay if first_delay is not None else min(FIRST_PASS_DELAY, every))
    while True:
        try:
            report = await retention_pass(store, policy, now=clock())
        except StoreError as exc:
            log.warning("retention pass failed: %s", exc, extra={"event": "retention-failed"})
        else:
            if report.deleted:
                _log(report)
        await anyio.sleep(every)
