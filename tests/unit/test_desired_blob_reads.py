"""The controller's pushes share one store read per blob, whatever fails."""

from __future__ import annotations

import anyio
import pytest

from controller.desired import DesiredConfig, DesiredState
from controller.document_cache import DocumentCache
from controller.registry import SessionRegistry
from controller.root_chains import RootChains
from controller.store.sqlite import SqliteStore
from margo_stream.errors import NotFound

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class CountingStore(SqliteStore):
    """The real store; counts blob reads."""

    reads = 0

    async def get_blob(self, tenant: str, digest: str) -> bytes:
        self.reads += 1
        return await super().get_blob(tenant, digest)


@pytest.fixture
async def desired(tmp_path):
    store = CountingStore(tmp_path / "controller.db")
    await store.open()
    config = DesiredConfig(certs=tmp_path / "certs", manifest_lifetime_days=30.0, push_window=512)

    class NoTasks:
        def spawn(self, fn, *args) -> None:
            raise AssertionError("reading blobs spawns nothing")

    try:
        yield DesiredState(
            config, store, SessionRegistry(), NoTasks(), DocumentCache(), RootChains(tmp_path)
        )
    finally:
        await store.close()


async def test_a_fan_out_reads_each_blob_once(desired: DesiredState) -> None:
    store = desired.store
    digest = await store.put_blob("acme", b"x" * 100_000)
    got: list[bytes] = []

    async def push() -> None:
        got.append(await desired._blob("acme", digest))

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(push)
    assert store.reads == 1
    assert len(got) == 200 and all(g == b"x" * 100_000 for g in got)
    assert await desired._blob("acme", digest) == b"x" * 100_000 and store.reads == 1  # cached


async def test_a_failed_read_fails_every_waiter_and_the_next_push_reads_again(
    desired: DesiredState,
) -> None:
    store = desired.store
    missing = "sha256:" + "0" * 64
    errors: list[Exception] = []

    async def push() -> None:
        try:
            await desired._blob("acme", missing)
        except NotFound as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(push)
    assert len(errors) == 20 and store.reads == 1
    digest = await store.put_blob("acme", b"late", digest=None)
    assert await desired._blob("acme", digest) == b"late"
    with pytest.raises(NotFound):
        await desired._blob("acme", missing)
    assert store.reads == 3
