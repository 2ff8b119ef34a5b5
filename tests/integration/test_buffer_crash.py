"""Crash and disk-full behaviour of the telemetry buffer, with a real agent process.

Producers write through the real socket and record every acknowledged seq; the process is
killed with SIGKILL at random moments and restarted; afterwards every acknowledged record is
present exactly once, in order, and no sequence number was handed out twice.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from agent.telemetry.buffer import BufferConfig, TelemetryBuffer
from margo_stream.telemetry_client import RecordRefused, TelemetryClient, TelemetryClientError

STUB = Path(__file__).with_name("telemetry_agent_stub.py")


class StubAgent:
    def __init__(self, state: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(STUB), str(state), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=20):
            self.kill()
            raise AssertionError("agent stub did not start")
        line = self.proc.stdout.readline()
        if line.strip() != b"READY":
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            error = self.proc.stderr.read()  # before kill() closes it
            self.kill()
            raise AssertionError(f"agent stub failed: {line!r} {error!r}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def read_all(directory: Path) -> tuple[list[tuple[int, dict]], object]:
    async def main() -> tuple[list[tuple[int, dict]], object]:
        async with TelemetryBuffer.open(directory, BufferConfig(max_bytes=64 << 20)) as buf:
            recs = buf.read(0, 10**7, 1 << 40)
            return [(r.seq, json.loads(r.payload)) for r in recs], buf.stats()

    return anyio.run(main)


def test_sigkill_at_random_moments_loses_no_acknowledged_record(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    sock = tmp_path / "telemetry.sock"
    acked: dict[int, tuple[int, int]] = {}  # seq -> (producer, n)
    lock = threading.Lock()
    reused: list[int] = []
    for round_ in range(6):
        agent = StubAgent(tmp_path, "--segment-bytes", "65536")
        target = len(acked) + rng.randint(300, 3000)
        reached = threading.Event()
        counters = [0] * 4

        def producer(
            pid: int,
            round_: int = round_,
            counters: list[int] = counters,
            target: int = target,
            reached: threading.Event = reached,
        ) -> None:
            client = TelemetryClient(sock, timeout=10)
            while True:
                batch = [
                    {"p": pid, "r": round_, "n": counters[pid] + i, "pad": "q" * 150}
                    for i in range(rng.randint(1, 40))
                ]
                counters[pid] += len(batch)
                try:
                    seqs = client.emit_many("crash", batch)
                except TelemetryClientError:
                    return  # killed mid-batch: these records are unacknowledged
                with lock:
                    for seq, rec in zip(seqs, batch, strict=True):
                        if seq in acked:
                            reused.append(seq)
                        acked[seq] = (rec["p"] + 10 * rec["r"], rec["n"])
                    if len(acked) >= target:
                        reached.set()

        threads = [threading.Thread(target=producer, args=(p,), daemon=True) for p in range(4)]
        for t in threads:
            t.start()
        assert reached.wait(timeout=20), "producers made no progress"
        agent.kill()  # SIGKILL while producers are mid-flight
        for t in threads:
            t.join(timeout=20)
            assert not t.is_alive()

    assert not reused, f"seqs handed out twice: {reused[:5]}"
    records, stats = read_all(tmp_path / "telemetry")
    seqs = [s for s, _ in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    by_seq = {s: (r["p"] + 10 * r["r"], r["n"]) for s, r in records}
    missing = [s for s in acked if s not in by_seq]
    assert not missing, f"{len(missing)} acknowledged records lost, e.g. {missing[:5]}"
    assert all(by_seq[s] == v for s, v in acked.items())
    ids = list(by_seq.values())
    assert len(ids) == len(set(ids)), "a record is present twice"
    # each producer's records are in the order it sent them
    per_producer: dict[int, list[int]] = {}
    for s in sorted(acked):
        per_producer.setdefault(acked[s][0], []).append(acked[s][1])
    assert all(v == sorted(v) for v in per_producer.values())
    assert stats.corrupt_records == 0
    assert stats.next_seq > max(acked)


def test_file_size_limit_gives_clear_refusal_and_buffer_stays_readable(tmp_path: Path) -> None:
    sock = tmp_path / "telemetry.sock"
    agent = StubAgent(tmp_path, "--fsize-limit", "200000", "--segment-bytes", "1048576")
    acked: list[int] = []
    try:
        with TelemetryClient(sock, timeout=10) as client:
            with pytest.raises(RecordRefused) as refused:
                for i in range(5000):
                    acked.append(client.emit("fill", {"i": i, "pad": "d" * 200}))
            assert "file size limit exceeded (EFBIG)" in str(refused.value)
            # still serving, and the failed write consumed no number and left no bytes: a
            # small record still fits, then a large one is refused the same clear way
            seq = client.emit("fill", {"i": len(acked)})
            assert seq == acked[-1] + 1
            acked.append(seq)
            with pytest.raises(RecordRefused, match="EFBIG"):
                client.emit("fill", {"i": -1, "pad": "d" * 4000})
    finally:
        agent.kill()
    assert len(acked) > 100
    records, stats = read_all(tmp_path / "telemetry")
    assert [s for s, _ in records] == acked
    assert [r["i"] for _, r in records] == list(range(len(acked)))
    assert stats.corrupt_records == 0 and stats.trimmed_bytes == 0
    for seg in (tmp_path / "telemetry").glob("seg-*.log"):
        assert os.path.getsize(seg) <= 200000
