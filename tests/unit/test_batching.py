"""WriteBatcher: concurrent submissions share writes, results go back to each submitter.
PartitionedBatcher: its batchers write side by side, one key's items in one batcher, in order."""

from __future__ import annotations

import anyio
import pytest

from controller.batching import PartitionedBatcher, WriteBatcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_concurrent_items_share_one_write_and_get_their_results():
    batches: list[list[int]] = []

    async def write(items):
        batches.append(list(items))
        # a transaction takes a while: every other submitter queues meanwhile
        await anyio.wait_all_tasks_blocked()
        return [i * 10 for i in items]

    batcher = WriteBatcher(write, max_items=50)
    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await batcher.submit(i)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(120):
                tg.start_soon(one, i)
    assert results == {i: i * 10 for i in range(120)}
    # the first item is written alone at once, the 119 queued behind it in batches of 50
    assert batches == [[0], list(range(1, 51)), list(range(51, 101)), list(range(101, 120))]


async def test_a_failed_write_reaches_every_item_of_its_batch_and_the_next_batch_runs():
    batches: list[list[int]] = []

    async def write(items):
        batches.append(list(items))
        await anyio.wait_all_tasks_blocked()  # the others queue behind this write
        if len(batches) == 2:
            raise OSError("disk full")
        return [True for _ in items]

    batcher = WriteBatcher(write, max_items=2)
    outcomes: dict[int, object] = {}

    async def one(i: int) -> None:
        try:
            outcomes[i] = await batcher.submit(i)
        except OSError as exc:
            outcomes[i] = exc

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
    assert batches == [[0], [1, 2], [3, 4]]
    error = outcomes[1]
    assert isinstance(error, OSError) and outcomes[2] is error  # both items of the failed batch
    assert outcomes[0] is True and outcomes[3] is True and outcomes[4] is True
    assert await batcher.submit(5) is True  # the batcher still writes after a failure


async def test_partitions_write_side_by_side_and_one_keys_items_never_race_out_of_order():
    in_flight: list[list[tuple[str, int]]] = []  # the batches being written right now
    most = 0
    written: dict[str, list[int]] = {}

    async def write(items):
        nonlocal most
        keys = {k for k, _ in items}
        for other in in_flight:  # a key's items are never in two writes at once
            assert keys.isdisjoint(k for k, _ in other), (items, other)
        in_flight.append(items)
        most = max(most, len(in_flight))
        for _ in range(5):  # a round trip: the other submitters run meanwhile
            await anyio.sleep(0)
        in_flight.remove(items)
        for k, n in items:
            written.setdefault(k, []).append(n)
        return [n for _, n in items]

    batcher = PartitionedBatcher(write, partitions=3, key=lambda item: item[0], max_items=7)
    keys = [f"device-{i}" for i in range(30)]

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for n in range(20):  # every key's items submitted in order, all at once
                for k in keys:
                    tg.start_soon(batcher.submit, (k, n))
                await anyio.sleep(0)
    assert written == {k: list(range(20)) for k in keys}  # each key's items in order
    assert most == 3  # the three batchers wrote at once


def test_a_partitioned_batcher_needs_a_partition():
    async def write(items):
        return None

    with pytest.raises(ValueError, match="at least 1 partition"):
        PartitionedBatcher(write, partitions=0, key=str)


async def test_an_idle_batcher_writes_now_and_a_busy_one_keeps_the_order():
    """try_now writes at once only when nothing of the batcher is in flight or waiting (an
    item never overtakes one submitted before it), and only when write_now can take it."""
    written: list[int] = []
    now_ok = True
    release = anyio.Event()

    async def write(items):
        await release.wait()
        written.extend(items)
        return [i * 10 for i in items]

    def write_now(items):
        if not now_ok:
            return None
        written.extend(items)
        return [i * 10 for i in items]

    batcher = WriteBatcher(write, write_now=write_now)
    assert batcher.try_now(1) == (True, 10) and written == [1]
    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.submit, 2)
        await anyio.wait_all_tasks_blocked()
        assert batcher.try_now(3) == (False, None)  # 2 is in flight: 3 must wait behind it
        release.set()
    assert written == [1, 2]
    now_ok = False
    assert batcher.try_now(4) == (False, None) and written == [1, 2]
    assert WriteBatcher(write).try_now(5) == (False, None)  # no write_now: never at once
