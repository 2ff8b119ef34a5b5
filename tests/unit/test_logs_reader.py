"""The agent's component logs: the runtime's rotated log stays within its bound (two files of
at most ``max_bytes``), and the reader's tail and follower read it back across rotations,
truncation and unfinished lines; the ``logs`` stream's state machine."""

from __future__ import annotations

import os

import pytest

from agent.logs.feature import BATCH_BYTES, batches, line_cost
from agent.logs.reader import Follower, rotated, tail
from agent.runtime.process import _Log
from margo_stream.errors import RemoteProtocolError
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import Sender, StreamKind
from margo_stream.protocol.streams import END, StreamMachine, kind_of_opener


def test_rotation_bound_and_tail_across_the_rotation(tmp_path):
    path = tmp_path / "work" / "dep" / "web.log"
    out = _Log(path, max_bytes=4096)
    for i in range(2000):
        out.write(f"line {i}\n".encode())
    out.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["web.log", "web.log.1"]  # one rotated predecessor, never more
    assert path.stat().st_size <= 4096 and rotated(path).stat().st_size <= 4096
    last = tail(path, 10)
    assert last.lines == [f"line {i}" for i in range(1990, 2000)]
    kept = path.stat().st_size + rotated(path).stat().st_size
    everything = tail(path, 10_000).lines
    assert everything[-1] == "line 1999" and sum(len(x) + 1 for x in everything) == kept
    assert tail(path, 0).lines == [] and tail(tmp_path / "absent.log", 5).lines == []


def test_follower_reads_appends_rotation_truncation_and_partial_lines(tmp_path):
    path = tmp_path / "c.log"
    out = _Log(path, max_bytes=200)
    out.write(b"old 1\nold 2\nhalf")
    start = tail(path, 5)
    assert start.lines == ["old 1", "old 2"] and start.partial == "half"
    follower = Follower(path, start.inode, start.offset)
    assert follower.poll() == []  # "half" waits for its end
    out.write(b" done\nnext\n")
    assert follower.poll() == ["half done", "next"]
    out.write(b"x" * 150 + b"\n")  # past 200 bytes: rotated to c.log.1, a new c.log
    out.write(b"after rotation\n")
    got = follower.poll() + follower.poll()
    assert got == ["x" * 150, "after rotation"] or got == ["after rotation"]
    os.truncate(path, 0)  # truncated in place
    out.close()
    out = _Log(path, max_bytes=200)
    out.write(b"fresh\n")
    assert follower.poll() == ["fresh"]
    out.write(b"tail without end")
    assert follower.poll() == [] and follower.flush() == ["tail without end"]
    follower.close()
    out.close()


def test_batches_are_bounded_in_bytes_and_lines():
    lines = ["y" * 1000] * 200 + ["z"] * 2000
    parts = batches(lines)
    assert sum(len(p) for p in parts) == len(lines)
    for part in parts:
        assert len(part) <= m.LOGS_MAX_BATCH
        assert sum(line_cost(x) for x in part) <= BATCH_BYTES
    m.LogsLines(component="c", lines=parts[0])  # each fits the message's bounds


def test_logs_stream_table():
    A, C = Sender.AGENT, Sender.CONTROLLER
    assert kind_of_opener("logs_open", C) is StreamKind.LOGS
    with pytest.raises(RemoteProtocolError):
        kind_of_opener("logs_open", A)  # only the controller asks
    sm = StreamMachine(StreamKind.LOGS, A)
    for sender, mtype in [
        (C, "logs_open"),
        (A, "logs_opened"),
        (A, "logs_lines"),
        (C, "logs_ack"),
        (A, "logs_lines"),
        (A, "logs_end"),
        (C, "logs_ack"),  # a late ack is harmless
        (A, END),
        (C, END),
    ]:
        sm.process(sender, mtype)
    refused = StreamMachine(StreamKind.LOGS, C)
    refused.process(C, "logs_open")
    with pytest.raises(RemoteProtocolError):
        refused.process(A, "logs_lines")  # lines before logs_opened
    with pytest.raises(ValueError):
        m.LogsOpen(deployment_id="../etc", tail=1)
    with pytest.raises(ValueError):
        m.LogsOpen(deployment_id="d", tail=10_001)
