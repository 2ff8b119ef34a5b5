"""PostgreSQL store, part: the deployment statuses devices report, and what they may claim.

The claims are checked as in SQLite (``controller.store.claims``: the manifest version and
the deployment must have been issued to the device), but set-wise: one statement reads, for
every item of a batch, the stored status, whether the device exists, whether the claimed
manifest version was issued to it and from which version the deployment was; the items are
then decided in order in Python exactly as SQLite decides them one by one (a later item of the
batch sees what an earlier one stored), and one statement writes what was accepted together
with the events it makes. A batch is two round trips whatever its size, and no transaction:
the write is one atomic statement (the read before it only decides what to write).

The write keeps the newest ``seq`` even against another controller writing the same status
at once (``WHERE statuses.seq < excluded.seq``).
"""

from __future__ import annotations

from collections.abc import Sequence

from controller.store.base import JsonDict, StatusRecord
from controller.store.base import resolve_now as _now
from controller.store.claims import NOT_ISSUED, UNKNOWN_VERSION, StatusRefusal, StatusRefused
from controller.store.pg_events import (
    STATEMENT,
    Transactions,
    Tx,
    add_event,
    events_sql,
    take_events,
)
from controller.store.sqlite_devices import device_not_found
from controller.store.sqlite_events import dumps, loads
from controller.store.sqlite_statuses import log_refusal, status_deployment_id, status_state

_MAX_BIGINT = 2**63 - 1

StatusItem = tuple[str, str, JsonDict, int]  # (tenant, device_id, status, seq)


def _claimed_version(status: JsonDict) -> int | None:
    """The claimed manifest version when it can be one (a positive bigint), else None."""
    claimed = status.get("adoptedManifestVersion")
    if isinstance(claimed, int) and not isinstance(claimed, bool) and 0 < claimed <= _MAX_BIGINT:
        return claimed
    return None


def _refusal(
    item: StatusItem, deployment_id: str, issued_version: bool, first_version: int | None
) -> StatusRefusal | None:
    tenant, device_id, status, _ = item
    claimed = _claimed_version(status)
    raw = status.get("adoptedManifestVersion")
    if claimed is None or not issued_version:
        return StatusRefusal(tenant, device_id, deployment_id, raw, UNKNOWN_VERSION)
    if first_version is None or first_version > claimed:
        return StatusRefusal(tenant, device_id, deployment_id, raw, NOT_ISSUED)
    return None


_FACTS = """
SELECT s.seq, s.state,
       EXISTS (SELECT 1 FROM devices d WHERE d.tenant = k.t AND d.device_id = k.d),
       EXISTS (SELECT 1 FROM manifests m
               WHERE m.tenant = k.t AND m.device_id = k.d AND m.version = k.v),
       (SELECT i.first_version FROM issued_deployments i
        WHERE i.tenant = k.t AND i.device_id = k.d AND i.deployment_id = k.p)
FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) WITH ORDINALITY AS k(t, d, p, v, n)
LEFT JOIN statuses s ON s.tenant = k.t AND s.device_id = k.d AND s.deployment_id = k.p
ORDER BY k.n
"""


_UPSERT = """
INSERT INTO statuses (tenant, device_id, deployment_id, status, seq, updated_at, state)
SELECT t, d, p, s, q, $6, st
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $7::text[])
    AS u(t, d, p, s, q, st)
ON CONFLICT (tenant, device_id, deployment_id) DO UPDATE SET
    status = excluded.status, seq = excluded.seq, updated_at = excluded.updated_at,
    state = excluded.state
WHERE statuses.seq < excluded.seq
RETURNING 1
"""


async def put_statuses(
    tx: Tx, items: Sequence[StatusItem], now: float, strict: bool
) -> list[bool | StatusRefusal]:
    """Decide and store ``items`` in order. ``strict`` (``put_status``/``put_statuses``): an
    unknown device raises ``NotFound`` and a refused claim ``StatusRefused``; otherwise
    (``put_status_batch``) they give ``False`` and the refusal. A status without a
    deployment id raises ``ValueError`` either way."""
    if not items:
        return []
    ids: list[str | ValueError] = []
    for _, _, status, _ in items:
        try:
            ids.append(status_deployment_id(status))
        except ValueError as exc:  # raised when its turn comes
            ids.append(exc)
    facts = await tx.conn.fetch(
        _FACTS,
        [i[0] for i in items],
        [i[1] for i in items],
        [p if isinstance(p, str) else "" for p in ids],
        [_claimed_version(i[2]) for i in items],
    )
    current: dict[tuple[str, str, str], tuple[int, str | None]] = {}  # seq, state
    for item, deployment_id, fact in zip(items, ids, facts, strict=True):
        if isinstance(deployment_id, str) and fact[0] is not None:
            key = (item[0], item[1], deployment_id)
            current.setdefault(key, (fact[0], fact[1]))
    results: list[bool | StatusRefusal] = []
    accepted: dict[tuple[str, str, str], tuple[JsonDict, int, str | None]] = {}
    for item, deployment_id, fact in zip(items, ids, facts, strict=True):
        tenant, device_id, status, seq = item
        if isinstance(deployment_id, ValueError):
            raise deployment_id
        key = (tenant, device_id, deployment_id)
        stored = current.get(key)
        if stored is None and not fact[2]:
            if strict:
                raise device_not_found(device_id)
            results.append(False)
            continue
        refusal = _refusal(item, deployment_id, fact[3], fact[4])
        if refusal is not None:
            if strict:
                raise StatusRefused(refusal)
            results.append(refusal)
            continue
        if stored is not None and seq <= stored[0]:
            results.append(False)
            continue
        state = status_state(status)
        previous = stored[1] if stored is not None else None
        current[key] = (seq, state)
        accepted[key] = (status, seq, state)
        results.append(True)
        if state != previous:
            add_event(
                tx,
                tenant,
                "deployment.status",
                device_id,
                {"deploymentId": deployment_id, "state": state, "previous": previous},
                now,
            )
    if accepted:
        keys = sorted(accepted)
        args: list[object] = [
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [dumps(accepted[k][0]) for k in keys],
            [accepted[k][1] for k in keys],
            now,
            [accepted[k][2] for k in keys],
        ]
        sql = _UPSERT
        if tx.events:  # the statuses and their events in one atomic statement
            sql = f"WITH written AS ({_UPSERT}) {events_sql(len(args) + 1, after='written')}"
            args += take_events(tx)
        tx.writing = True
        await tx.conn.execute(sql, *args)
    return results


async def list_statuses(tx: Tx, tenant: str, device_id: str | None) -> list[StatusRecord]:
    columns = "tenant, device_id, deployment_id, status, seq, updated_at"
    if device_id is None:
        rows = await tx.conn.fetch(
            f"SELECT {columns} FROM statuses WHERE tenant = $1 ORDER BY device_id, deployment_id",
            tenant,
        )
    else:
        rows = await tx.conn.fetch(
            f"SELECT {columns} FROM statuses WHERE tenant = $1 AND device_id = $2"
            " ORDER BY deployment_id",
            tenant,
            device_id,
        )
    return [StatusRecord(r[0], r[1], r[2], loads(r[3]), r[4], r[5]) for r in rows]


class PgStatuses(Transactions):
    """The status methods of ``Store``; ``PgStore`` inherits them and supplies the
    transactions (``_write``/``_read`` run a coroutine function of a ``Tx``).

    ``write_concurrency``: the controller runs this many ``put_status_batch`` calls at once
    (one connection each, devices hashed over them: ``controller.status``); one at a time,
    the round trips set the rate. Batches of different devices touch different rows, and a
    status is written only over an older ``seq``, so they need no order between them."""

    write_concurrency = 2

    async def put_status_batch(
        self, items: Sequence[StatusItem], *, now: float | None = None
    ) -> list[bool | StatusRefusal]:
        results = await self._run(STATEMENT, put_statuses, list(items), _now(now), False)
        for result in results:
            if isinstance(result, StatusRefusal):
                log_refusal(result)
        return results

    async def put_status(
        self,
        tenant: str,
        device_id: str,
        status: JsonDict,
        seq: int,
        *,
        now: float | None = None,
    ) -> bool:
        [stored] = await self._strict([(tenant, device_id, status, seq)], now)
        return stored

    async def put_statuses(
        self,
        tenant: str,
        device_id: str,
        items: Sequence[tuple[JsonDict, int]],
        *,
        now: float | None = None,
    ) -> int:
        if not items:
            return 0
        results = await self._strict([(tenant, device_id, s, q) for s, q in items], now)
        return sum(results)

    async def _strict(self, items: list[StatusItem], now: float | None) -> list[bool]:
        try:
            results = await self._run(STATEMENT, put_statuses, items, _now(now), True)
        except StatusRefused as exc:
            log_refusal(exc.refusal)
            raise
        return [r is True for r in results]

    async def list_statuses(self, tenant: str, device_id: str | None = None) -> list[StatusRecord]:
        return await self._read(list_statuses, tenant, device_id)
