"""A small record kept durably with one ``fdatasync`` per change: two slots, written in turn.

``fsutil.atomic_write`` (a temporary file, its fsync, a rename, the directory's fsync) costs
about 1 ms on the disks measured here; a device pays it on every accepted push before it may
report ``installed``. A ``SlotFile`` keeps the same promise, a reader finds either the old
record or the new one and never a torn one, for about a fifth of that:

- the file holds two slots of ``slot_size`` bytes (a multiple of 4 KiB, so no disk sector is
  shared between them); each slot is a header (magic, format, sequence number, length, the
  SHA-256 of the payload) and the payload;
- a change writes the slot *not* holding the newest record, in place, with the next sequence
  number, then ``fdatasync``: the file's size never changes, so no metadata needs flushing and
  the newest intact record is never touched;
- reading takes the intact slot (magic, length and checksum good) with the higher sequence
  number: a write torn by a crash or a power cut fails its checksum, and the other slot, the
  previous record, is read.

A record too large for its slot is written the slow way once: a new two-slot file with room for
twice that size replaces the old one through ``atomic_write``. A file that is not in this format
(an older release's plain file, say) is returned as it is by :meth:`SlotFile.read`, and the first
write converts it, also through ``atomic_write``.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from margo_stream.fsutil import atomic_write

MAGIC = b"MSSLOT1\0"
_HEADER = struct.Struct(">8sQI32s")  # magic, sequence number, payload length, SHA-256
HEADER_SIZE = _HEADER.size
BLOCK = 4096


def _slot_size_for(length: int) -> int:
    """Room for a payload twice ``length``, in whole 4 KiB blocks."""
    need = HEADER_SIZE + 2 * length
    return max(BLOCK, -(-need // BLOCK) * BLOCK)


def _encode(seq: int, payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, seq, len(payload), hashlib.sha256(payload).digest()) + payload


def _decode(raw: bytes) -> tuple[int, bytes] | None:
    """(sequence number, payload) of one slot's bytes, or None when the slot is not intact."""
    if len(raw) < HEADER_SIZE:
        return None
    magic, seq, length, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC or HEADER_SIZE + length > len(raw):
        return None
    payload = raw[HEADER_SIZE : HEADER_SIZE + length]
    if hashlib.sha256(payload).digest() != digest:
        return None
    return seq, payload


def _is_slot_file(data: bytes) -> bool:
    """Either slot begins with the magic (a plain text file has no NUL in its first bytes)."""
    half = len(data) // 2
    return data.startswith(MAGIC) or (half >= BLOCK and data[half : half + len(MAGIC)] == MAGIC)


class SlotFileError(OSError):
    """The file is in the slot format but neither slot holds an intact record."""


class SlotFile:
    """The newest record of ``path``; :meth:`write` replaces it durably and atomically.

    Not thread-safe: one writer (the caller serialises, as the trust state's owner does)."""

    def __init__(self, path: Path, *, mode: int = 0o600) -> None:
        self.path = Path(path)
        self.mode = mode
        self._seq = 0  # sequence number of the newest record (0: none in slot format)
        self._slot_size = 0  # 0: the file is not (yet) in slot format

    def read(self) -> bytes | None:
        """The newest intact record, or None when the file does not exist. A file that is not
        in slot format is returned whole (an older plain file). ``SlotFileError`` when the
        file is in slot format and neither slot is intact."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        slot_size = len(data) // 2
        if not _is_slot_file(data):
            self._seq, self._slot_size = 0, 0
            return data
        if slot_size < BLOCK or slot_size % BLOCK or len(data) != 2 * slot_size:
            raise SlotFileError(f"{self.path}: slot file of {len(data)} bytes is truncated")
        found = [r for r in (_decode(data[:slot_size]), _decode(data[slot_size:])) if r]
        if not found:
            raise SlotFileError(f"{self.path}: neither slot holds an intact record")
        seq, payload = max(found)
        self._seq, self._slot_size = seq, slot_size
        return payload

    def write(self, payload: bytes) -> None:
        """Make ``payload`` the record: durable when this returns (``OSError`` otherwise, with
        the previous record still the one read back)."""
        seq = self._seq + 1
        record = _encode(seq, payload)
        if self._slot_size and len(record) <= self._slot_size:
            offset = (seq % 2) * self._slot_size
            fd = os.open(self.path, os.O_WRONLY)
            try:
                view = memoryview(record)
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
                os.fdatasync(fd)
            finally:
                os.close(fd)
        else:
            self._relayout(seq, record, _slot_size_for(len(payload)))
        self._seq = seq

    def _relayout(self, seq: int, record: bytes, slot_size: int) -> None:
        """A whole new file with ``record`` in its slot and the other slot empty, replacing
        the old one atomically (first write, conversion, or a record outgrowing its slot)."""
        slots = [bytes(slot_size), bytes(slot_size)]
        slots[seq % 2] = record.ljust(slot_size, b"\0")
        atomic_write(self.path, b"".join(slots), mode=self.mode)
        self._slot_size = slot_size


__all__ = ["HEADER_SIZE", "MAGIC", "SlotFile", "SlotFileError"]
