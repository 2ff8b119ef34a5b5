"""The store's rollout part on both stores: create (name unique per tenant), compare-and-set
saves with their events, listing, and the lease that lets one controller run each rollout."""

from __future__ import annotations

import pytest

from controller.store.pg import PgStore
from controller.store.rollouts import RolloutConflict, RolloutExists
from controller.store.sqlite import SqliteStore
from margo_stream.errors import NotFound

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "controller.db")
    else:
        s = PgStore(request.getfixturevalue("pg_dsn"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_create_save_list(store) -> None:
    rec = await store.create_rollout(
        "acme",
        "r1",
        spec={"name": "r1"},
        state={"phase": "running"},
        phase="running",
        events=[("rollout.created", None, {"rollout": "r1"})],
        now=100.0,
    )
    assert (rec.version, rec.phase, rec.state, rec.owner) == (
        1,
        "running",
        {"phase": "running"},
        None,
    )
    with pytest.raises(RolloutExists):
        await store.create_rollout("acme", "r1", spec={}, state={}, phase="running")
    await store.create_rollout("globex", "r1", spec={}, state={}, phase="running", now=101.0)
    saved = await store.save_rollout(
        "acme",
        "r1",
        version=1,
        state={"phase": "paused"},
        phase="paused",
        events=[("rollout.paused", None, {"rollout": "r1"}), ("rollout.joined", "d1", {})],
    )
    assert saved.version == 2 and saved.phase == "paused"
    with pytest.raises(RolloutConflict):
        await store.save_rollout("acme", "r1", version=1, state={}, phase="running")
    assert (await store.get_rollout("acme", "r1")).state == {"phase": "paused"}
    with pytest.raises(NotFound):
        await store.get_rollout("acme", "nope")
    assert [r.name for r in await store.list_rollouts("acme")] == ["r1"]
    kinds = [(e.kind, e.device_id) for e in await store.list_events("acme")]
    assert kinds == [("rollout.created", None), ("rollout.paused", None), ("rollout.joined", "d1")]


async def test_lease_one_owner_at_a_time(store) -> None:
    for name in ("a", "b"):
        await store.create_rollout("acme", name, spec={}, state={}, phase="running", now=1.0)
    await store.create_rollout("acme", "done", spec={}, state={}, phase="succeeded", now=2.0)
    assert await store.claim_rollouts("i1", ttl=15, now=100) == [("acme", "a"), ("acme", "b")]
    assert await store.claim_rollouts("i2", ttl=15, now=110) == []  # held by i1
    assert await store.claim_rollouts("i1", ttl=15, now=112) == [("acme", "a"), ("acme", "b")]
    assert await store.claim_rollouts("i2", ttl=15, now=126) == []  # renewed until 127
    assert len(await store.claim_rollouts("i2", ttl=15, now=128)) == 2  # i1's lease expired
    assert len(await store.claim_rollouts("i3", ttl=15, now=129, steal=True)) == 2
    await store.release_rollouts("i3")
    assert len(await store.claim_rollouts("i1", ttl=15, now=130)) == 2
