"""The producer socket: local processes hand telemetry to the agent over STATE/telemetry.sock.

Protocol: newline-delimited JSON objects in, one reply line per input line out, in order:
``{"seq": N}`` once the record is durable in the buffer, or ``{"error": "..."}`` saying why it
was refused. A ``stream`` field names the series (``"default"`` when absent); the agent adds
``ts`` (receive time, Unix seconds) when the producer did not. Records that already carry both
are stored byte for byte as sent (minus surrounding whitespace).

Pipelining: a connection's reader parses each received chunk, writes its records to the buffer
in one batch (no await) and hands the batch to the connection's replier through a bounded
memory stream; the replier waits for the batch's group commit and writes the replies. Per
connection, at most ``max_batches`` chunks of at most ``READ_SIZE`` bytes are in flight; when
that many await durability the reader stops reading and the socket pushes back on the producer.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc

from agent.telemetry.buffer import PendingAppend, TelemetryBuffer
from agent.telemetry.streams import DEFAULT_STREAM
from margo_stream.errors import TelemetryBufferError

log = logging.getLogger(__name__)

SOCKET_NAME = "telemetry.sock"
SOCKET_MODE = 0o660
READ_SIZE = 65536


class SocketInUse(TelemetryBufferError):
    """Another live process already serves the telemetry socket."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A valid producer line: the payload to store and the stream it names."""

    stream: str
    payload: bytes


@dataclass(slots=True)
class _Batch:
    # Per input line: an error message, or (index into ``pendings``, seq).
    entries: list[str | tuple[int, int]]
    pendings: list[PendingAppend]


def prepare_record(line: bytes, limit: int) -> Prepared | str:
    """Validate one producer line; returns the record to store or an error message."""
    line = line.strip()
    if not line:
        return "empty line; expected one JSON object"
    if len(line) > limit:
        return f"record of {len(line)} bytes exceeds the {limit}-byte record limit"
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not JSON: {exc}"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    stream = obj.get("stream")
    changed = False
    if stream is None:
        obj["stream"] = stream = DEFAULT_STREAM
        changed = True
    elif not isinstance(stream, str) or not stream:
        return '"stream" must be a non-empty string'
    if "ts" not in obj:
        obj["ts"] = round(time.time(), 6)
        changed = True
    if changed:
        line = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        if len(line) > limit:
            return f"record of {len(line)} bytes exceeds the {limit}-byte record limit"
    return Prepared(stream, line)


def _submit(buffer: TelemetryBuffer, prepared: list[Prepared | str]) -> _Batch:
    entries: list[str | tuple[int, int]] = []
    pendings: list[PendingAppend] = []
    records = [p for p in prepared if isinstance(p, Prepared)]
    if records:
        try:
            pending = buffer.submit(
                [r.payload for r in records],
                streams=[r.stream for r in records],
                count_rejected=False,
            )
        except TelemetryBufferError:
            pending = None
        if pending is not None:
            pendings.append(pending)
            seqs = iter(pending.seqs)
            for p in prepared:
                entries.append((0, next(seqs)) if isinstance(p, Prepared) else p)
            return _Batch(entries, pendings)
    # Slow path (buffer full, disk error, or nothing valid): one record at a time, so every
    # line gets its own answer.
    for p in prepared:
        if isinstance(p, str):
            entries.append(p)
            continue
        try:
            pending = buffer.submit((p.payload,), streams=(p.stream,))
        except TelemetryBufferError as exc:
            entries.append(str(exc))
            continue
        pendings.append(pending)
        entries.append((len(pendings) - 1, pending.seqs.start))
    return _Batch(entries, pendings)


def _error_line(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"


async def _reply(batch: _Batch) -> bytes:
    failed: dict[int, str] = {}
    for i, pending in enumerate(batch.pendings):
        try:
            await pending.wait()
        except TelemetryBufferError as exc:
            failed[i] = str(exc)
    out = []
    for entry in batch.entries:
        if isinstance(entry, str):
            out.append(_error_line(entry))
        elif entry[0] in failed:
            out.append(_error_line(failed[entry[0]]))
        else:
            out.append(b'{"seq":%d}\n' % entry[1])
    return b"".join(out)


class _Connection:
    def __init__(self, buffer: TelemetryBuffer, stream: anyio.abc.SocketStream, max_batches: int):
        self.buffer = buffer
        self.stream = stream
        self.max_batches = max_batches
        self.limit = buffer.config.max_record_bytes

    async def run(self) -> None:
        send, recv = anyio.create_memory_object_stream[_Batch](self.max_batches)
        async with self.stream, anyio.create_task_group() as tg:
            tg.start_soon(self._replier, recv, tg.cancel_scope)
            async with send:
                await self._reader(send)

    async def _reader(self, send: anyio.abc.ObjectSendStream[_Batch]) -> None:
        partial = b""
        oversized = False  # inside a line already known to exceed the limit
        slack = self.limit + 1024
        while True:
            try:
                chunk = await self.stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                chunk = b""
            if not chunk:
                if partial or oversized:
                    line_result = (
                        self._oversized() if oversized else prepare_record(partial, self.limit)
                    )
                    await send.send(_submit(self.buffer, [line_result]))
                return
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            prepared: list[Prepared | str] = []
            for line in lines:
                if oversized:
                    prepared.append(self._oversized())
                    oversized = False
                else:
                    prepared.append(prepare_record(line, self.limit))
            if len(partial) > slack:
                partial = b""
                oversized = True
            if prepared:
                await send.send(_submit(self.buffer, prepared))

    def _oversized(self) -> str:
        return f"record exceeds the {self.limit}-byte record limit"

    async def _replier(
        self, recv: anyio.abc.ObjectReceiveStream[_Batch], scope: anyio.CancelScope
    ) -> None:
        async with recv:
            async for batch in recv:
                data = await _reply(batch)
                try:
                    await self.stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    scope.cancel()  # producer went away; stop reading its lines
                    return


def _refuse_if_live(path: Path) -> None:
    """Raise SocketInUse when another process accepts connections on ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.info("removing stale telemetry socket %s", path)
            return
        raise
    finally:
        probe.close()
    raise SocketInUse(f"another agent is already serving {path}")


async def serve_telemetry_socket(
    buffer: TelemetryBuffer,
    socket_path: Path,
    *,
    max_batches: int = 16,
    task_status: anyio.abc.TaskStatus[Path] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve producers until cancelled. Use ``await tg.start(serve_telemetry_socket, buf, p)``.

    A stale socket file (nobody listening) is replaced; a live one raises ``SocketInUse``.
    The socket is created with mode 0660 and removed when the server stops.
    """
    socket_path = Path(socket_path)
    _refuse_if_live(socket_path)
    listener = await anyio.create_unix_listener(socket_path, mode=SOCKET_MODE)
    ino = os.stat(socket_path).st_ino

    async def handle(stream: anyio.abc.SocketStream) -> None:
        try:
            await _Connection(buffer, stream, max_batches).run()
        except Exception:
            log.exception("telemetry producer connection failed")

    try:
        async with listener, anyio.create_task_group() as tg:
            task_status.started(socket_path)
            await listener.serve(handle, task_group=tg)
    finally:
        try:
            if os.stat(socket_path).st_ino == ino:
                os.unlink(socket_path)
        except FileNotFoundError:
            pass
