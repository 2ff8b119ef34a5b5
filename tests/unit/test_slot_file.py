"""The two-slot record file: old or new after any torn write, never neither; one fdatasync."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from margo_stream.slot_file import BLOCK, HEADER_SIZE, MAGIC, SlotFile, SlotFileError


def test_round_trip_and_alternating_slots(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    f = SlotFile(path)
    assert f.read() is None
    f.write(b"one")
    size = path.stat().st_size
    assert size == 2 * BLOCK
    f.write(b"two")
    f.write(b"three")
    assert path.stat().st_size == size  # written in place: no new file, no size change
    again = SlotFile(path)
    assert again.read() == b"three"
    again.write(b"four")
    assert SlotFile(path).read() == b"four"


def test_in_place_writes_keep_the_inode(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    f = SlotFile(path)
    f.write(b"a")
    inode = path.stat().st_ino
    for i in range(10):
        f.write(b"x" * i)
    assert path.stat().st_ino == inode


def test_a_torn_write_leaves_the_previous_record(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    f = SlotFile(path)
    f.write(b"old record")
    f.write(b"new record")  # sequence 2: slot 0
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 2] ^= 0xFF  # the newest record's payload torn
    path.write_bytes(bytes(data))
    assert SlotFile(path).read() == b"old record"
    # and the next write goes over the torn slot, not over the intact one
    g = SlotFile(path)
    assert g.read() == b"old record"
    g.write(b"after")
    assert SlotFile(path).read() == b"after"


def test_both_slots_broken_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    SlotFile(path).write(b"x")
    path.write_bytes(MAGIC + bytes(2 * BLOCK - len(MAGIC)))
    with pytest.raises(SlotFileError, match="neither slot"):
        SlotFile(path).read()
    path.write_bytes(MAGIC + b"short")
    with pytest.raises(SlotFileError, match="truncated"):
        SlotFile(path).read()


def test_a_plain_file_is_read_whole_and_converted_on_write(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    path.write_bytes(b'{"format": 2}\n')
    f = SlotFile(path)
    assert f.read() == b'{"format": 2}\n'
    f.write(b'{"format": 3}\n')
    assert MAGIC in path.read_bytes() and path.stat().st_size == 2 * BLOCK
    assert SlotFile(path).read() == b'{"format": 3}\n'


def test_a_record_outgrowing_its_slot_gets_a_larger_file(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    f = SlotFile(path)
    f.write(b"small")
    big = os.urandom(3 * BLOCK)
    f.write(big)
    assert path.stat().st_size >= 2 * (HEADER_SIZE + len(big))
    assert SlotFile(path).read() == big
    f.write(b"small again")
    assert SlotFile(path).read() == b"small again"


def test_mode_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    SlotFile(path, mode=0o600).write(b"secret-ish")
    assert path.stat().st_mode & 0o777 == 0o600
