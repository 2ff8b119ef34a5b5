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
        await anyio.sleep(0.01)  # a transaction takes a while: others queue meanwhile
        return [i * 10 for i in items]

    batcher = WriteBatcher(write, max_items=50)
    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await batcher.submit(i)

    async with anyio.create_task_group() as tg:
        for i in range(120):
            tg.start_soon(one, i)
    assert results == {i: i * 10 for i in range(120)}
    assert len(batches) < 10 and max(map(len, batches)) <= 50
    assert sorted(x for b in batches for x in b) == list(range(120))


async def test_a_failed_write_reaches_every_item_of_its_batch_and_the_next_batch_runs():
    calls = 0

    async def write(items):
        nonlocal calls
        calls += 1
        await anyio.sleep(0.01)
        if calls == 1:
            raise OSError("disk full")
        return [True for _ in items]

    batcher = WriteBatcher(write)
    outcomes: list[object] = []

    async def one(i: int) -> None:
        try:
            outcomes.append(await batcher.submit(i))
        except OSError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(one, i)
            await anyio.sleep(0)
    assert any(isinstance(o, OSError) for o in outcomes) and True in outcomes
