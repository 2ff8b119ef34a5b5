"""The agent's own metrics, written into its telemetry buffer as stream ``agent.metrics``."""

from __future__ import annotations

import json
import logging
import time

import anyio
import anyio.abc
import psutil

from agent.telemetry.buffer import TelemetryBuffer
from margo_stream.errors import TelemetryBufferError

log = logging.getLogger(__name__)

METRICS_STREAM = "agent.metrics"


def sample_agent_metrics(buffer: TelemetryBuffer, proc: psutil.Process) -> dict[str, object]:
    """One metrics record: process CPU % since the last sample, RSS and buffer counters."""
    st = buffer.stats()
    return {
        "stream": METRICS_STREAM,
        "ts": round(time.time(), 6),
        "cpu_percent": proc.cpu_percent(None),
        "rss_bytes": proc.memory_info().rss,
        "buffer_bytes": st.bytes_used,
        "buffer_max_bytes": st.max_bytes,
        "buffer_fill": round(st.fill_ratio, 6),
        "buffer_records": st.records_retained,
        "dropped_records": st.dropped_records,
        "rejected_records": st.rejected_records,
        "corrupt_records": st.corrupt_records,
        "acked_seq": st.acked_seq,
        "next_seq": st.next_seq,
    }


async def run_agent_metrics(
    buffer: TelemetryBuffer,
    interval_s: float,
    *,
    max_samples: int | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Append a metrics record every ``interval_s`` seconds (``max_samples`` then return).

    A refused append (buffer full under ``reject``, disk error) is logged and the loop goes on:
    the next sample carries the counters that explain it.
    """
    proc = psutil.Process()
    proc.cpu_percent(None)  # prime: the first reading covers the time since this call
    task_status.started()
    taken = 0
    while max_samples is None or taken < max_samples:
        await anyio.sleep(interval_s)
        record = sample_agent_metrics(buffer, proc)
        try:
            await buffer.append(json.dumps(record, separators=(",", ":")).encode(), METRICS_STREAM)
        except TelemetryBufferError as exc:
            log.warning("agent metrics sample not stored: %s", exc)
        taken += 1
