"""WriteBatcher: concurrent submissions share writes, results go back to each submitter."""

from __future__ import annotations

import anyio
import pytest

from controller.batching import WriteBatcher

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
