"""Group commit rounds against real segment files: a descriptor is closed only when no round
still needs it."""

from __future__ import annotations

import os

import anyio

from agent.telemetry.commit import GroupCommit
from agent.telemetry.segments import Segment


def close_fd(seg: Segment) -> None:
    if seg.fd >= 0:
        os.close(seg.fd)
        seg.fd = -1


def test_a_segment_deleted_while_written_during_a_round_is_synced_then_closed(tmp_path) -> None:
    """Seen under load: the active segment was fsynced, written again meanwhile, then dropped
    (drop-oldest) before the round ended; the round closed its descriptor although the next
    round still had to fsync it, and that round crashed the agent on fd -1."""
    commit = GroupCommit(tmp_path, window_s=0.0, max_records=1000)
    seg = Segment.create(tmp_path, 1, 0)
    commit.dirty[seg] = None
    errors: list[BaseException] = []

    async def round_() -> None:
        _, exc = await commit.sync_round(skip=False, close_fd=close_fd)
        if exc is not None:
            errors.append(exc)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(round_)
            await anyio.sleep(0)  # the round took its snapshot and waits for its fsync
            assert commit.in_flight(seg) and not commit.dirty
            os.pwrite(seg.fd, b"more", seg.size)  # written again during the round ...
            commit.dirty[seg] = None
            seg.retired = True  # ... and then dropped, while the round is still running
            os.unlink(seg.path)
        assert seg.fd >= 0  # still needed by the next round
        await round_()  # fsyncs it, then closes it
        assert seg.fd == -1 and not commit.in_flight(seg)

    anyio.run(main)
    assert errors == []
