"""Client for the agent's producer socket (STATE/telemetry.sock).

Each record is one JSON object on one line; the agent answers every line, in order, with
``{"seq": N}`` once the record is durable or ``{"error": "..."}``. ``emit`` sends one record and
waits for its answer; ``emit_many`` pipelines a batch on the same connection.

    with TelemetryClient(state_dir / "telemetry.sock") as client:
        seq = client.emit("line3.temperature", {"celsius": 71.5})
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from margo_stream.errors import TelemetryBufferError

MAX_REPLY = 64 * 1024


class TelemetryClientError(TelemetryBufferError):
    """Talking to the agent's telemetry socket failed."""


class AgentUnavailable(TelemetryClientError):
    """No agent is listening on the telemetry socket (not running, or wrong --state)."""


class RecordRefused(TelemetryClientError):
    """The agent answered ``{"error": ...}`` for a record."""


def encode_record(stream: str, fields: Mapping[str, Any]) -> bytes:
    record = dict(fields)
    record["stream"] = stream
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def decode_reply(line: bytes) -> int:
    try:
        reply = json.loads(line)
    except ValueError as exc:
        raise TelemetryClientError(f"unreadable reply from the agent: {line[:200]!r}") from exc
    if isinstance(reply, dict):
        if "error" in reply:
            raise RecordRefused(f"agent refused the record: {reply['error']}")
        seq = reply.get("seq")
        if isinstance(seq, int):
            return seq
    raise TelemetryClientError(f"unexpected reply from the agent: {line[:200]!r}")


def _unavailable(path: Path, exc: OSError) -> AgentUnavailable:
    return AgentUnavailable(
        f"cannot reach the agent's telemetry socket {path}: {exc.strerror or exc} "
        "(agent not running, or running with another --state directory)"
    )


class TelemetryClient:
    """Blocking client; connects on first use and keeps the connection."""

    def __init__(self, socket_path: Path | str, *, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> TelemetryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.socket_path))
            except OSError as exc:
                sock.close()
                raise _unavailable(self.socket_path, exc) from exc
            self._sock = sock
        return self._sock

    def _readline(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buf:
            try:
                chunk = sock.recv(65536)
            except OSError as exc:
                self.close()
                raise TelemetryClientError(f"telemetry socket failed: {exc}") from exc
            if not chunk:
                self.close()
                raise TelemetryClientError("the agent closed the telemetry connection")
            self._buf += chunk
            if len(self._buf) > MAX_REPLY and b"\n" not in self._buf:
                self.close()
                raise TelemetryClientError("reply from the agent too long")
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _send(self, data: bytes) -> socket.socket:
        sock = self._connect()
        try:
            sock.sendall(data)
        except OSError as exc:
            self.close()
            raise TelemetryClientError(f"telemetry socket failed: {exc}") from exc
        return sock

    def emit(self, stream: str, fields: Mapping[str, Any]) -> int:
        """Store one record; returns its sequence number once the agent made it durable."""
        sock = self._send(encode_record(stream, fields))
        return decode_reply(self._readline(sock))

    def emit_many(self, stream: str, records: Iterable[Mapping[str, Any]]) -> list[int]:
        """Pipeline several records; raises ``RecordRefused`` for the first refused one
        (after reading every reply, so the connection stays usable)."""
        lines = [encode_record(stream, r) for r in records]
        sock = self._send(b"".join(lines))
        seqs: list[int] = []
        first_error: RecordRefused | None = None
        for _ in lines:
            try:
                seqs.append(decode_reply(self._readline(sock)))
            except RecordRefused as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return seqs


class AsyncTelemetryClient:
    """anyio client; one request at a time per client (use several clients for concurrency)."""

    def __init__(self, socket_path: Path | str, *, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self._stream: anyio.abc.SocketStream | None = None
        self._buf = b""
        self._lock = anyio.Lock()

    async def __aenter__(self) -> AsyncTelemetryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None
            self._buf = b""

    async def _connect(self) -> anyio.abc.SocketStream:
        if self._stream is None:
            try:
                self._stream = await anyio.connect_unix(self.socket_path)
            except OSError as exc:
                raise _unavailable(self.socket_path, exc) from exc
        return self._stream

    async def _readline(self, stream: anyio.abc.SocketStream) -> bytes:
        while b"\n" not in self._buf:
            try:
                chunk = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                await self.aclose()
                raise TelemetryClientError("the agent closed the telemetry connection") from exc
            self._buf += chunk
            if len(self._buf) > MAX_REPLY and b"\n" not in self._buf:
                await self.aclose()
                raise TelemetryClientError("reply from the agent too long")
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    async def emit_many(self, stream: str, records: Iterable[Mapping[str, Any]]) -> list[int]:
        lines = [encode_record(stream, r) for r in records]
        async with self._lock:
            with anyio.fail_after(self.timeout):
                conn = await self._connect()
                try:
                    await conn.send(b"".join(lines))
                except (anyio.BrokenResourceError, OSError) as exc:
                    await self.aclose()
                    raise TelemetryClientError(f"telemetry socket failed: {exc}") from exc
                seqs: list[int] = []
                first_error: RecordRefused | None = None
                for _ in lines:
                    try:
                        seqs.append(decode_reply(await self._readline(conn)))
                    except RecordRefused as exc:
                        first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return seqs

    async def emit(self, stream: str, fields: Mapping[str, Any]) -> int:
        """Store one record; returns its sequence number once the agent made it durable."""
        return (await self.emit_many(stream, [fields]))[0]
