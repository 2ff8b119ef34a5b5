"""Group concurrent store writes of one kind into one transaction.

When thousands of devices report at once (a fan-out's statuses, their adoptions), one SQLite
transaction each would queue them for seconds on the store's single thread. A ``WriteBatcher``
collects what is submitted while a transaction runs and writes it all in the next one: no
timer, no added latency when it is idle (a lone item is written at once), bounded batches.

One ``WriteBatcher`` has one write in flight at a time. A store that takes several at once to
good effect (a server, where the round trip sets the rate; not SQLite's single thread) gets a
``PartitionedBatcher``: K batchers, each item sent to the one its key hashes to, so the items
of one key (one device's statuses) stay in one batcher, written in the order submitted, while
the K batchers write side by side.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")
R = TypeVar("R")


WriteNow = Callable[[Sequence[T]], Sequence[R] | None]


class _Slot(Generic[R]):
    __slots__ = ("done", "result", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: R | None = None
        self.error: BaseException | None = None


class WriteBatcher(Generic[T, R]):
    def __init__(
        self,
        write: Callable[[Sequence[T]], Awaitable[Sequence[R] | None]],
        *,
        max_items: int = 1000,
        write_now: WriteNow[T, R] | None = None,
    ) -> None:
        """``write_now``: the same write done before it returns, or ``None`` when it cannot
        be without waiting (then nothing was written); see :meth:`try_now`."""
        self._write = write
        self._write_now = write_now
        self._max = max_items
        self._pending: list[tuple[T, _Slot[R]]] = []
        self._writing = False

    def try_now(self, item: T) -> tuple[bool, R | None]:
        """``(True, result)`` when ``item`` was written before this returned: nothing of this
        batcher was in flight or waiting (order kept) and ``write_now`` could take it;
        ``(False, None)`` otherwise, nothing written: :meth:`submit` it."""
        if self._writing or self._pending or self._write_now is None:
            return False, None
        results = self._write_now([item])
        if results is None:
            return False, None
        return True, results[0]

    async def submit(self, item: T) -> R | None:
        """Write ``item`` (with whatever else is waiting) and return its result."""
        slot: _Slot[R] = _Slot()
        self._pending.append((item, slot))
        if not self._writing:
            self._writing = True
            try:
                while self._pending:
                    batch, self._pending = self._pending[: self._max], self._pending[self._max :]
                    try:
                        results = await self._write([i for i, _ in batch])
                    except Exception as exc:  # noqa: BLE001 - handed to every waiter
                        for _, s in batch:
                            s.error = exc
                            s.done.set()
                        continue
                    for k, (_, s) in enumerate(batch):
                        s.result = results[k] if results is not None else None
                        s.done.set()
            finally:
                self._writing = False
                for _, s in self._pending:  # only when this writer was cancelled mid-way
                    s.error = RuntimeError("the store writer was cancelled")
                    s.done.set()
                self._pending = []
        if not slot.done.is_set():  # written above: no turn of the loop to learn it
            await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result


class PartitionedBatcher(Generic[T, R]):
    """``partitions`` ``WriteBatcher``s over one ``write``, which must accept that many calls
    at once: an item goes to the batcher its ``key`` hashes to (a stable hash), so items of one
    key are never written concurrently, and are written in the order they were submitted."""

    def __init__(
        self,
        write: Callable[[Sequence[T]], Awaitable[Sequence[R] | None]],
        *,
        partitions: int,
        key: Callable[[T], str],
        max_items: int = 1000,
        write_now: WriteNow[T, R] | None = None,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"a batcher needs at least 1 partition, not {partitions}")
        self._key = key
        self._batchers = [
            WriteBatcher(write, max_items=max_items, write_now=write_now) for _ in range(partitions)
        ]

    @property
    def partitions(self) -> int:
        return len(self._batchers)

    def _batcher(self, item: T) -> WriteBatcher[T, R]:
        return self._batchers[zlib.crc32(self._key(item).encode()) % len(self._batchers)]

    async def submit(self, item: T) -> R | None:
        """``WriteBatcher.submit`` on the batcher of ``item``'s key."""
        return await self._batcher(item).submit(item)

    def try_now(self, item: T) -> tuple[bool, R | None]:
        """``WriteBatcher.try_now`` on the batcher of ``item``'s key."""
        return self._batcher(item).try_now(item)
