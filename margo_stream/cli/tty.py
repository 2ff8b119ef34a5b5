"""Operator-side terminal helpers for ``margoctl terminal``.

* :func:`raw_mode` puts the local terminal into raw mode (every byte, including Ctrl-C, goes
  to the remote shell; the remote pseudo-terminal does echo and line editing) and always puts
  the saved attributes back.
* :func:`get_winsize` / :func:`set_winsize` read and write a terminal's size.
* :func:`winsize_changes` turns SIGWINCH into an async iterator of new sizes for an anyio
  program, so the caller can send resize messages.

Usage sketch::

    with raw_mode(sys.stdin.fileno()), winsize_changes(sys.stdout.fileno()) as sizes:
        async with anyio.create_task_group() as tg:
            tg.start_soon(forward_resizes, sizes)
            ...
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import struct
import termios
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import anyio

__all__ = ["WinsizeChanges", "get_winsize", "raw_mode", "set_winsize", "winsize_changes"]

log = logging.getLogger(__name__)

# Indices into the list returned by termios.tcgetattr.
_IFLAG, _OFLAG, _CFLAG, _LFLAG, _ISPEED, _OSPEED, _CC = range(7)


# termios.tcgetattr's list mixes integer flags with the list of control characters; typeshed
# types it list[Any], and tcsetattr takes the same.
def _raw_attributes(attrs: list[Any]) -> list[Any]:
    """The attributes of cfmakeraw(3) applied to a copy of ``attrs``."""
    raw = list(attrs)
    raw[_CC] = list(attrs[_CC])
    raw[_IFLAG] &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
    )
    raw[_OFLAG] &= ~termios.OPOST
    raw[_LFLAG] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    raw[_CFLAG] &= ~(termios.CSIZE | termios.PARENB)
    raw[_CFLAG] |= termios.CS8
    raw[_CC][termios.VMIN] = 1
    raw[_CC][termios.VTIME] = 0
    return raw


@contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put the terminal ``fd`` into raw mode for the ``with`` block.

    The saved attributes are restored on every exit (normal return, exception,
    KeyboardInterrupt, generator close). If ``fd`` is not a terminal (input piped from a
    file), nothing is changed and the block simply runs.
    """
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        # TCSADRAIN: let queued output finish first; keep input the user already typed.
        termios.tcsetattr(fd, termios.TCSADRAIN, _raw_attributes(saved))
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except (termios.error, OSError) as exc:
            # The terminal went away (hangup); there is nothing left to restore.
            log.debug("could not restore terminal attributes: %s", exc)


def get_winsize(fd: int) -> tuple[int, int]:
    """Return the terminal's size as ``(rows, cols)``.

    Falls back to ``LINES``/``COLUMNS`` or 24x80 when ``fd`` is not a terminal or the
    terminal reports a zero size (some serial consoles do).
    """
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
        rows, cols, _, _ = struct.unpack("HHHH", packed)
    except OSError:
        rows = cols = 0
    if rows <= 0 or cols <= 0:
        fallback = shutil.get_terminal_size((80, 24))
        rows, cols = rows or fallback.lines, cols or fallback.columns
    return rows, cols


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Set the terminal's size (``TIOCSWINSZ``); mainly for tests and local PTY pairs."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class WinsizeChanges:
    """Async iterator of ``(rows, cols)`` after each SIGWINCH that changed the size.

    Several SIGWINCH in quick succession are coalesced into the size current when the
    iterator is next read, and a signal that left the size unchanged yields nothing.
    """

    def __init__(self, signals: AsyncIterator[int], fd: int) -> None:
        self._signals = signals
        self._fd = fd
        self._last = get_winsize(fd)

    @property
    def current(self) -> tuple[int, int]:
        """The size last reported (or measured when the iterator was created)."""
        return self._last

    def __aiter__(self) -> WinsizeChanges:
        return self

    async def __anext__(self) -> tuple[int, int]:
        while True:
            await self._signals.__anext__()
            size = get_winsize(self._fd)
            if size != self._last:
                self._last = size
                return size


@contextmanager
def winsize_changes(fd: int) -> Iterator[WinsizeChanges]:
    """Watch SIGWINCH while the block runs, reporting the new size of terminal ``fd``.

    Must be entered from the main thread, inside a running anyio event loop; the signal
    handler is removed on exit.
    """
    with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
        yield WinsizeChanges(signals, fd)
