"""Producer socket, clients, ``margo-agent emit`` and the agent's own metrics stream."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import anyio
import pytest

from agent.telemetry.buffer import BufferConfig, FullPolicy, TelemetryBuffer
from agent.telemetry.emit_cmd import run_emit
from agent.telemetry.ingest import SOCKET_NAME, SocketInUse, serve_telemetry_socket
from agent.telemetry.metrics import METRICS_STREAM, run_agent_metrics
from margo_stream.telemetry_client import (
    AgentUnavailable,
    AsyncTelemetryClient,
    RecordRefused,
    TelemetryClient,
)

CFG = BufferConfig(max_bytes=1 << 20, max_record_bytes=1024, commit_window_s=0.001)


async def _recv_lines(stream, n: int) -> list[dict]:
    buf = b""
    with anyio.fail_after(10):
        while buf.count(b"\n") < n:
            buf += await stream.receive()
    return [json.loads(line) for line in buf.splitlines()]


def test_pipelined_lines_answered_in_order(tmp_path: Path) -> None:
    sock = tmp_path / SOCKET_NAME

    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path / "telemetry", CFG) as buf:
            async with anyio.create_task_group() as tg:
                await tg.start(serve_telemetry_socket, buf, sock)
                assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
                lines = [
                    b'{"stream":"press.temp","v":1,"ts":1.5}',
                    b"not json",
                    b"[1,2]",
                    b'{"v":2}',
                    b'{"stream":7}',
                    b'{"pad":"' + b"x" * 2000 + b'"}',
                    b"",
                    b'{"stream":"press.temp","v":3}\r',
                ]
                stream = await anyio.connect_unix(sock)
                async with stream:
                    # many lines in flight, split at awkward places
                    data = b"\n".join(lines) + b"\n"
                    for i in range(0, len(data), 7):
                        await stream.send(data[i : i + 7])
                    replies = await _recv_lines(stream, len(lines))
                assert replies[0] == {"seq": 1}
                assert "not JSON" in replies[1]["error"]
                assert "expected a JSON object" in replies[2]["error"]
                assert replies[3] == {"seq": 2}
                assert "stream" in replies[4]["error"]
                assert "record limit" in replies[5]["error"]
                assert "empty line" in replies[6]["error"]
                assert replies[7] == {"seq": 3}
                recs = buf.read(0, 10, 1 << 20)
                assert recs[0].payload == lines[0]  # stored as sent
                second = json.loads(recs[1].payload)
                assert second["stream"] == "default" and second["v"] == 2 and "ts" in second

                # a long pipelined burst over several connections
                async def burst(k: int) -> list[int]:
                    async with AsyncTelemetryClient(sock) as client:
                        return await client.emit_many(
                            "burst", ({"k": k, "i": i} for i in range(2000))
                        )

                results: dict[int, list[int]] = {}

                async def run_burst(k: int) -> None:
                    results[k] = await burst(k)

                async with anyio.create_task_group() as tg2:
                    for k in range(4):
                        tg2.start_soon(run_burst, k)
                all_seqs = sorted(s for v in results.values() for s in v)
                assert len(set(all_seqs)) == 8000
                for v in results.values():
                    assert v == sorted(v)
                async with AsyncTelemetryClient(sock) as client:
                    with pytest.raises(RecordRefused, match="record limit"):
                        await client.emit("big", {"pad": "y" * 5000})
                    assert await client.emit("ok", {"a": 1}) == buf.next_seq - 1
                tg.cancel_scope.cancel()
        assert not sock.exists()

    anyio.run(main)


def test_sync_client_and_emit_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / SOCKET_NAME

    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path / "telemetry", CFG) as buf:
            async with anyio.create_task_group() as tg:
                await tg.start(serve_telemetry_socket, buf, sock)

                def produce() -> tuple[int, list[int], int, int]:
                    with TelemetryClient(sock) as client:
                        one = client.emit("line3", {"celsius": 71.5})
                        many = client.emit_many("line3", [{"i": i} for i in range(50)])
                    ok = run_emit(tmp_path, "cli", '{"x": 1}')
                    bad = run_emit(tmp_path, "cli", "[1]")
                    return one, many, ok, bad

                one, many, ok, bad = await anyio.to_thread.run_sync(produce)
                assert one == 1 and many == list(range(2, 52))
                assert ok == 0 and bad == 1
                last = json.loads(buf.read(52, 1, 1 << 20)[0].payload)
                assert last["stream"] == "cli" and last["x"] == 1
                tg.cancel_scope.cancel()

    anyio.run(main)
    out, err = capsys.readouterr()
    assert out.strip() == "52"
    assert err.count("\n") == 1 and "JSON object" in err


def test_emit_without_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_emit(tmp_path, "s", '{"a": 1}') == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not running" in err
    with pytest.raises(AgentUnavailable):
        TelemetryClient(tmp_path / SOCKET_NAME).emit("s", {})


def test_stale_socket_replaced_live_socket_refused(tmp_path: Path) -> None:
    sock = tmp_path / SOCKET_NAME
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens: what a killed agent leaves behind

    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path / "telemetry", CFG) as buf:
            async with anyio.create_task_group() as tg:
                await tg.start(serve_telemetry_socket, buf, sock)
                with pytest.raises(SocketInUse, match="already serving"):
                    await serve_telemetry_socket(buf, sock)
                async with AsyncTelemetryClient(sock) as client:
                    assert await client.emit("s", {}) == 1
                tg.cancel_scope.cancel()

    anyio.run(main)


def test_reject_policy_answers_with_error(tmp_path: Path) -> None:
    sock = tmp_path / SOCKET_NAME
    cfg = BufferConfig(max_bytes=16384, max_record_bytes=1024, policy=FullPolicy.REJECT)

    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path / "telemetry", cfg) as buf:
            async with anyio.create_task_group() as tg:
                await tg.start(serve_telemetry_socket, buf, sock)
                stream = await anyio.connect_unix(sock)
                async with stream:
                    line = json.dumps({"stream": "s", "pad": "z" * 500}).encode() + b"\n"
                    await stream.send(line * 60)
                    replies = await _recv_lines(stream, 60)
                ok = [r["seq"] for r in replies if "seq" in r]
                errors = [r["error"] for r in replies if "error" in r]
                assert ok == list(range(1, len(ok) + 1)) and errors
                assert all("buffer full" in e for e in errors)
                assert replies[: len(ok)] == [{"seq": s} for s in ok]  # refusals come last
                assert buf.stats().rejected_records == len(errors)
                tg.cancel_scope.cancel()

    anyio.run(main)


def test_agent_metrics_stream(tmp_path: Path) -> None:
    async def main() -> None:
        async with TelemetryBuffer.open(tmp_path / "telemetry", CFG) as buf:
            await run_agent_metrics(buf, 0.01, max_samples=2)
            recs = [json.loads(r.payload) for r in buf.read(0, 10, 1 << 20)]
        assert len(recs) == 2
        for r in recs:
            assert r["stream"] == METRICS_STREAM
            assert r["rss_bytes"] > 0 and r["cpu_percent"] >= 0
            assert 0 <= r["buffer_fill"] <= 1 and r["dropped_records"] == 0

    anyio.run(main)
