"""Opening a telemetry buffer directory: the recovery scan.

``recover`` runs once, in a worker thread, before the buffer accepts appends. It removes stray
temporary files, reads the acknowledgement mark (``ackmark.py``), and scans every segment (framing
in ``segments.py``):

* segments wholly at or below the acknowledged mark, or holding nothing live, are deleted;
* everything after the newest segment's last valid record is a torn tail (a crash can persist
  the pages of an unsynced batch in any order): it is trimmed, and counted in ``trimmed_bytes``;
* any other damaged region is corruption: the unacknowledged records it held are logged and
  counted in ``corrupt_records``, never silently skipped;
* ``next_seq`` is set above every number any surviving byte can prove was handed out (newest
  segment's base, highest intact header, acknowledged mark and its floor, and a bound on how
  many records a damaged tail could have held), so a number is never reused.

The newest segment is reused when it is empty and intact; otherwise a fresh active segment is
created (and fsynced with its directory).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from agent.telemetry.ackmark import load_ack
from agent.telemetry.segments import (
    REC_HDR_SIZE,
    SEG_HDR_SIZE,
    Segment,
    decode_segment_header,
    list_segments,
    scan_segment,
)
from margo_stream.fsutil import fsync_dir

# Recovery is part of opening the buffer: it logs under the buffer's name.
log = logging.getLogger("agent.telemetry.buffer")


@dataclass(slots=True)
class Recovered:
    """What the scan found: open segments (oldest first, the active one last) and counters."""

    segments: list[Segment]
    next_seq: int
    acked_seq: int
    bytes_used: int
    corrupt_records: int
    trimmed_bytes: int


def recover(d: Path, max_bytes: int) -> Recovered:
    """Scan the directory, trim a torn tail, count corruption, restore the counters."""
    d.mkdir(parents=True, exist_ok=True)
    for stray in d.glob(".*.tmp-*"):
        stray.unlink(missing_ok=True)
    acked, floor = load_ack(d)
    corrupt_records = 0
    trimmed_bytes = 0
    found = list_segments(d)
    next_seq = max(1, acked + 1, floor)
    keep: list[Segment] = []
    obsolete: list[Path] = []
    reuse: Segment | None = None
    last_present = acked
    for i, (name_base, path) in enumerate(found):
        is_last = i == len(found) - 1
        if not is_last and found[i + 1][0] - 1 <= acked:
            obsolete.append(path)  # wholly acknowledged
            continue
        data = path.read_bytes()
        header = decode_segment_header(data)
        if header is None:
            log.warning(
                "telemetry segment %s: damaged header; using the base in its name", path.name
            )
            base = name_base
        else:
            base = header[0]
        next_seq = max(next_seq, base)
        scan = scan_segment(data, base)
        next_seq = max(next_seq, scan.max_seq_seen + 1)
        if is_last and len(data) > scan.valid_end >= SEG_HDR_SIZE:
            # Everything after the newest segment's last valid record is a torn tail: a
            # crash can persist the pages of an unsynced batch in any order.
            tail = [r for r in scan.bad if r.start >= scan.valid_end]
            scan.bad = [r for r in scan.bad if r.start < scan.valid_end]
            cut = len(data) - scan.valid_end
            known = [r.seq for r in tail if r.seq is not None]
            log.warning(
                "telemetry segment %s: trimmed torn tail of %d bytes at offset %d%s",
                path.name,
                cut,
                scan.valid_end,
                f" (partial record(s) seq {known})" if known else "",
            )
            if any(r.seq is None for r in tail):
                # Unknown framing: never reuse a number such bytes could have held.
                next_seq = max(next_seq, tail[0].prev_seq + 2 + cut // REC_HDR_SIZE)
            with open(path, "r+b") as fh:
                fh.truncate(scan.valid_end)
                os.fsync(fh.fileno())
            trimmed_bytes += cut
            data = data[: scan.valid_end]
        elif (
            not is_last and scan.bad and scan.bad[-1].end == len(data) and scan.bad[-1].seq is None
        ):
            # Damage up to the end of a sealed segment: the next segment's header says
            # which numbers this one held.
            end_region = scan.bad[-1]
            nxt = decode_segment_header(found[i + 1][1].read_bytes()[:SEG_HDR_SIZE])
            end_region.records = max(1, nxt[1] - end_region.prev_seq) if nxt else 1
        live_bad = []
        for region in scan.bad:
            first = region.seq if region.seq is not None else region.prev_seq + 1
            lost = first + region.records - 1 - max(first - 1, acked)
            if lost <= 0:
                continue
            live_bad.append(region)
            corrupt_records += lost
            log.error(
                "telemetry segment %s: corrupt record(s) at offset %d (%d bytes, seq %s); "
                "counted %d unacknowledged record(s) as lost",
                path.name,
                region.start,
                region.end - region.start,
                region.seq if region.seq is not None else f"unknown, after {region.prev_seq}",
                lost,
            )
        live = bool(scan.seqs) and scan.seqs[-1] > acked
        if (
            is_last
            and header is not None
            and not scan.seqs
            and not scan.bad
            and base == next_seq == name_base
        ):
            reuse = Segment(path, base, os.open(path, os.O_RDWR), len(data))
            continue
        if not live and not live_bad:
            obsolete.append(path)
            continue
        seg = Segment(path, base, os.open(path, os.O_RDWR), len(data))
        seg.seqs, seg.offsets, seg.lengths = scan.seqs, scan.offsets, scan.lengths
        seg.sealed = True
        keep.append(seg)
        present = scan.seqs[-1] if scan.seqs else 0
        for region in scan.bad:
            present = max(present, region.seq or 0, region.prev_seq + region.records)
        last_present = max(last_present, present)
    if reuse is not None:
        active = reuse
    else:
        # the newest file may carry this very name and still be of no use (killed before
        # its header was written): it is replaced, never missing, so the name keeps the
        # highest sequence number handed out even across a crash right here
        active = Segment.create(d, next_seq, last_present, replace=True)
        os.fsync(active.fd)
        fsync_dir(d)
    for path in obsolete:
        if path != active.path:
            path.unlink(missing_ok=True)
    if obsolete:
        fsync_dir(d)
    segments = [*keep, active]
    bytes_used = sum(s.size for s in segments)
    if bytes_used > max_bytes:
        log.warning(
            "telemetry buffer holds %d bytes, more than max_bytes %d (limit lowered?)",
            bytes_used,
            max_bytes,
        )
    log.info(
        "telemetry buffer %s opened: next_seq %d, acked %d, %d segment(s), %d bytes",
        d,
        next_seq,
        acked,
        len(segments),
        bytes_used,
    )
    return Recovered(
        segments=segments,
        next_seq=next_seq,
        acked_seq=acked,
        bytes_used=bytes_used,
        corrupt_records=corrupt_records,
        trimmed_bytes=trimmed_bytes,
    )
