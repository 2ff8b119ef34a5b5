"""The telemetry buffer's persisted acknowledgement mark, ``ack.json``.

The mark records the highest sequence number the controller acknowledged, and a floor for
``next_seq`` (one above the highest durable number when the mark was written). It is read once
when the buffer opens and written atomically, lazily: ``AckMark.run`` waits until
acknowledgements have stopped arriving for ``flush_s`` (or the buffer closes) and then
persists the latest value. Losing the latest mark in a crash only means a few acknowledged
records are replayed again.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import anyio

from agent.telemetry.disk_errors import describe_oserror
from margo_stream.fsutil import atomic_write

# The mark is part of the buffer: it logs under the buffer's name.
log = logging.getLogger("agent.telemetry.buffer")

ACK_FILE = "ack.json"

# Returns (acked_seq, next_seq_floor) at the moment the mark is written.
MarkSource = Callable[[], tuple[int, int]]


def load_ack(directory: Path) -> tuple[int, int]:
    """(acked_seq, next_seq_floor) from ``directory/ack.json``; (0, 0) if it is missing.

    An unreadable file is logged and the buffer replays from the start.
    """
    path = directory / ACK_FILE
    acked = 0
    try:
        doc = json.loads(path.read_bytes())
        acked = int(doc["acked_seq"])
        return acked, int(doc.get("next_seq_floor", 0))
    except FileNotFoundError:
        return 0, 0
    except (ValueError, KeyError, TypeError) as exc:
        log.error("telemetry ack file %s unreadable (%s); replaying from the start", path, exc)
        return acked, 0


class AckMark:
    """Writes the acknowledgement mark of one buffer directory, at most every ``flush_s``."""

    def __init__(self, directory: Path, flush_s: float) -> None:
        self.path = directory / ACK_FILE
        self.flush_s = flush_s
        self.persisted = 0
        self._lock = anyio.Lock()
        self._wake = anyio.Event()
        self._closing = False

    def moved(self) -> None:
        """The acknowledged sequence number moved: persist it soon."""
        self._wake.set()

    def close(self) -> None:
        """Stop ``run`` after one last write."""
        self._closing = True
        self._wake.set()

    async def persist(self, mark: MarkSource) -> None:
        """Write the mark now, if it moved past what was last persisted."""
        async with self._lock:
            value, floor = mark()
            if value <= self.persisted:
                return
            doc = json.dumps({"acked_seq": value, "next_seq_floor": floor})
            try:
                await anyio.to_thread.run_sync(
                    functools.partial(atomic_write, self.path, doc.encode(), mode=0o640)
                )
            except OSError as exc:
                log.warning("telemetry ack mark not persisted: %s", describe_oserror(exc))
                return
            self.persisted = value

    async def run(self, mark: MarkSource) -> None:
        """Persist the mark once acknowledgements pause for ``flush_s``, and when closing."""
        while not self._closing:
            await self._wake.wait()
            self._wake = anyio.Event()
            if not self._closing:
                with anyio.move_on_after(self.flush_s):
                    while not self._closing:
                        await self._wake.wait()
                        self._wake = anyio.Event()
            await self.persist(mark)
        await self.persist(mark)
