"""Reading a component's rotated log as lines: the last N, then what is appended.

Theory of operation
-------------------
A runtime writes each component's stdout and stderr to ``<state>/work/<deployment>/<name>.log``
and rotates it to ``<name>.log.1`` when it would pass its size bound (1 MiB by default), so at
most two bounded files exist per component (``agent.runtime.process``). :func:`tail` reads the
last ``n`` complete lines across both files, newest last, and says where the current file's
complete lines end; a :class:`Follower` continues from there. Each :meth:`Follower.poll`
reads what was appended since (at most ``READ_CHUNK`` bytes a call), notices a rotation (the
name now points at another inode: the rest of the old file is read first) and a truncation
(the file shrank: read from its start), and returns the complete lines; an unfinished last
line waits for its end, or for :meth:`Follower.flush` when the log ends. Bytes decode as
UTF-8 with replacement; a line longer than ``LOGS_MAX_LINE`` characters is cut.

Everything here is plain blocking file I/O on files the agent bounds; ``tail`` may read a
couple of MiB and is run in a worker thread, ``poll`` reads small chunks on the loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from margo_stream.protocol.messages import LOGS_MAX_LINE

READ_CHUNK = 256 * 1024  # bytes one poll reads at most
TAIL_MAX_BYTES = 8 << 20  # bytes of the two files tail reads at most (far above the bound)
CUT_MARK = " [...]"


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def decode_lines(data: bytes) -> list[str]:
    """Complete lines of ``data`` (which ends with a newline or is a final fragment)."""
    if not data:
        return []
    text = data.decode("utf-8", "replace")
    out = []
    for line in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
        line = line.removesuffix("\r")
        if len(line) > LOGS_MAX_LINE:
            line = line[: LOGS_MAX_LINE - len(CUT_MARK)] + CUT_MARK
        out.append(line)
    return out


def _read_end(path: Path, limit: int) -> tuple[bytes, int | None, int]:
    """The last ``limit`` bytes of ``path``, its inode and size (``b"", None, 0`` if absent)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return b"", None, 0
    try:
        st = os.fstat(fd)
        start = max(0, st.st_size - limit)
        os.lseek(fd, start, os.SEEK_SET)
        chunks = []
        remaining = st.st_size - start
        while remaining > 0:
            data = os.read(fd, min(remaining, 1 << 20))
            if not data:
                break
            chunks.append(data)
            remaining -= len(data)
        return b"".join(chunks), st.st_ino, start + sum(len(c) for c in chunks)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Tail:
    lines: list[str]  # the last complete lines, oldest first
    partial: str  # an unfinished last line ("" if none)
    inode: int | None  # of the current file when read (None: there was none)
    offset: int  # where its complete lines end: a follower starts here


def tail(path: Path, n: int) -> Tail:
    """The last ``n`` complete lines of the log at ``path`` (and its rotated predecessor)."""
    current, inode, size = _read_end(path, TAIL_MAX_BYTES)
    cut = current.rfind(b"\n") + 1
    complete, partial = current[:cut], current[cut:]
    offset = size - len(partial)
    if n <= 0:
        return Tail([], partial.decode("utf-8", "replace"), inode, offset)
    lines = decode_lines(complete)
    if len(lines) < n:
        older, _, _ = _read_end(rotated(path), TAIL_MAX_BYTES)
        if older and not older.endswith(b"\n"):
            older += b"\n"  # a line cut by rotation still ends where its file ends
        lines = decode_lines(older) + lines
    return Tail(lines[-n:], partial.decode("utf-8", "replace"), inode, offset)


class Follower:
    """New complete lines of the log at ``path`` from (``inode``, ``offset``) on."""

    def __init__(self, path: Path, inode: int | None, offset: int) -> None:
        self.path = path
        self._want_inode = inode
        self._offset = offset
        self._fd: int | None = None
        self._pending = b""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            return False
        st = os.fstat(fd)
        if st.st_ino != self._want_inode or st.st_size < self._offset:
            self._offset = 0  # a new file (rotated meanwhile), or the old one truncated
        os.lseek(fd, self._offset, os.SEEK_SET)
        self._fd = fd
        self._want_inode = st.st_ino
        return True

    def _read(self, budget: int) -> bytes:
        assert self._fd is not None
        out = []
        while budget > 0:
            data = os.read(self._fd, min(budget, 65536))
            if not data:
                break
            out.append(data)
            budget -= len(data)
        return b"".join(out)

    def poll(self) -> list[str]:
        """Complete lines appended since the last call (``READ_CHUNK`` bytes at most)."""
        if self._fd is None and not self._open():
            return []
        assert self._fd is not None
        data = self._read(READ_CHUNK)
        if not data:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            mine = os.fstat(self._fd)
            if st is None or st.st_ino != mine.st_ino:  # rotated (or removed): the new file
                self.close()
                self._offset = 0
                self._want_inode = None
                if st is not None:
                    self._open()
                    data = self._read(READ_CHUNK)
            elif st.st_size < os.lseek(self._fd, 0, os.SEEK_CUR):  # truncated in place
                os.lseek(self._fd, 0, os.SEEK_SET)
                data = self._read(READ_CHUNK)
        if not data:
            return []
        buf = self._pending + data
        cut = buf.rfind(b"\n") + 1
        self._pending = buf[cut:]
        if len(self._pending) > 4 * 65536:  # a newline-less flood: pass it on as a line
            buf, cut, self._pending = buf + b"\n", len(buf) + 1, b""
        return decode_lines(buf[:cut])

    def flush(self) -> list[str]:
        """The unfinished last line, if any (the log ended)."""
        pending, self._pending = self._pending, b""
        return decode_lines(pending)
