"""PostgreSQL store, part: desired state (blobs, deployments, assignments, manifests).

Runs inside the caller's transaction (a ``Tx``). The semantics are SQLite's
(``controller.store.sqlite_desired``); what touches many devices at once (an apply, an assign,
a fleet-wide batch of manifests) is written set-wise, a few statements whatever the number of
devices, instead of a round trip per device. Storing a manifest records which deployments it
issued to the device (``issued_deployments``): what the device may report on.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from controller.store.base import (
    AssignmentRecord,
    DeploymentDraft,
    DeploymentRecord,
    ManifestRecord,
    VersionConflict,
)
from controller.store.pg_devices import require_devices
from controller.store.pg_events import Tx, add_event, affected
from controller.store.sqlite_devices import device_not_found
from controller.store.sqlite_statuses import issued_deployment_ids
from margo_stream.errors import NotFound
from margo_stream.state.digest import sha256_digest

# -- blobs -----------------------------------------------------------------------------------


async def put_blob(tx: Tx, tenant: str, data: bytes, digest: str | None, now: float) -> str:
    actual = sha256_digest(data)
    if digest is not None and digest != actual:
        raise ValueError(f"blob digest mismatch: given {digest}, content is {actual}")
    await tx.conn.execute(
        "INSERT INTO blobs (tenant, digest, data, created) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (tenant, digest) DO NOTHING",
        tenant,
        actual,
        bytes(data),
        now,
    )
    return actual


async def get_blob(tx: Tx, tenant: str, digest: str) -> bytes:
    data = await tx.conn.fetchval(
        "SELECT data FROM blobs WHERE tenant = $1 AND digest = $2", tenant, digest
    )
    if data is None:
        raise NotFound(f"blob {digest} not found")
    return bytes(data)


async def has_blob(tx: Tx, tenant: str, digest: str) -> bool:
    found = await tx.conn.fetchval(
        "SELECT 1 FROM blobs WHERE tenant = $1 AND digest = $2", tenant, digest
    )
    return found is not None


async def missing_blobs(tx: Tx, tenant: str, digests: Sequence[str]) -> list[str]:
    wanted = list(dict.fromkeys(digests))
    rows = await tx.conn.fetch(
        "SELECT digest FROM blobs WHERE tenant = $1 AND digest = ANY($2::text[])", tenant, wanted
    )
    have = {r[0] for r in rows}
    return [d for d in wanted if d not in have]


# -- deployments -----------------------------------------------------------------------------

_DEPLOYMENT_COLUMNS = (
    "tenant, deployment_id, digest, name, profile, created, signature, certificate"
)


async def put_deployment(
    tx: Tx,
    tenant: str,
    deployment_id: str,
    document: bytes,
    name: str,
    profile: str,
    now: float,
    signature: str | None = None,
    certificate: str | None = None,
) -> DeploymentRecord:
    if not deployment_id:
        raise ValueError("deployment id must not be empty")
    digest = await put_blob(tx, tenant, document, None, now)
    # As SQLite: re-applying the newest version unchanged keeps its signature; bringing an
    # older version back takes the new one (and makes it the newest: ``created`` is now).
    newest = await tx.conn.fetchrow(
        "SELECT digest, signature FROM deployments WHERE tenant = $1 AND deployment_id = $2"
        " ORDER BY created DESC LIMIT 1",
        tenant,
        deployment_id,
    )
    if newest is not None and newest[0] == digest and newest[1] is not None:
        signature, certificate = None, None
    row = await tx.conn.fetchrow(
        "INSERT INTO deployments (tenant, deployment_id, digest, name, profile, created,"
        " signature, certificate) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (tenant, deployment_id, digest) DO UPDATE SET"
        " name = excluded.name, profile = excluded.profile, created = excluded.created,"
        " signature = coalesce(excluded.signature, deployments.signature),"
        " certificate = coalesce(excluded.certificate, deployments.certificate)"
        f" RETURNING {_DEPLOYMENT_COLUMNS}",
        tenant,
        deployment_id,
        digest,
        name,
        profile,
        now,
        signature,
        certificate,
    )
    assert row is not None
    return DeploymentRecord(*row)


async def get_deployment(
    tx: Tx, tenant: str, deployment_id: str, digest: str | None
) -> DeploymentRecord:
    if digest is None:
        row = await tx.conn.fetchrow(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments"
            " WHERE tenant = $1 AND deployment_id = $2 ORDER BY created DESC LIMIT 1",
            tenant,
            deployment_id,
        )
    else:
        row = await tx.conn.fetchrow(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments"
            " WHERE tenant = $1 AND deployment_id = $2 AND digest = $3",
            tenant,
            deployment_id,
            digest,
        )
    if row is None:
        what = deployment_id if digest is None else f"{deployment_id}@{digest}"
        raise NotFound(f"deployment {what!r} not found")
    return DeploymentRecord(*row)


async def list_deployments(tx: Tx, tenant: str) -> list[DeploymentRecord]:
    rows = await tx.conn.fetch(
        f"SELECT DISTINCT ON (deployment_id) {_DEPLOYMENT_COLUMNS} FROM deployments"
        " WHERE tenant = $1 ORDER BY deployment_id, created DESC",
        tenant,
    )
    return [DeploymentRecord(*r) for r in rows]


# -- assignments -----------------------------------------------------------------------------


async def assign(
    tx: Tx,
    tenant: str,
    device_ids: Sequence[str],
    deployment_id: str,
    digest: str,
    now: float,
    *,
    events: bool = True,
) -> list[str]:
    """Assign the deployment version to the devices; returns the devices it changed."""
    await get_deployment(tx, tenant, deployment_id, digest)
    await require_devices(tx, tenant, device_ids)
    targets = list(dict.fromkeys(device_ids))
    if not targets:
        return []
    rows = await tx.conn.fetch(
        "INSERT INTO assignments (tenant, device_id, deployment_id, digest, assigned_at)"
        " SELECT $1, d, $3, $4, $5 FROM unnest($2::text[]) AS d"
        " ON CONFLICT (tenant, device_id, deployment_id) DO UPDATE SET"
        " digest = excluded.digest, assigned_at = excluded.assigned_at"
        " WHERE assignments.digest <> excluded.digest"
        " RETURNING device_id",
        tenant,
        targets,
        deployment_id,
        digest,
        now,
    )
    touched = {r[0] for r in rows}
    changed = [d for d in targets if d in touched]
    if events:
        for device_id in changed:
            add_event(
                tx,
                tenant,
                "deployment.assigned",
                device_id,
                {"deploymentId": deployment_id, "digest": digest},
                now,
            )
    return changed


async def apply(
    tx: Tx,
    tenant: str,
    blobs: Sequence[bytes],
    deployments: Sequence[DeploymentDraft],
    devices: Sequence[str],
    now: float,
) -> list[DeploymentRecord]:
    """Blobs, deployment versions and assignments of one apply, with one event (the caller's
    transaction makes it all or nothing)."""
    for blob in blobs:
        await put_blob(tx, tenant, blob, None, now)
    records = []
    changed: dict[str, None] = {}
    for draft in deployments:
        record = await put_deployment(
            tx,
            tenant,
            draft.deployment_id,
            draft.document,
            draft.name,
            draft.profile,
            now,
            draft.signature,
            draft.certificate,
        )
        records.append(record)
        for device_id in await assign(
            tx, tenant, devices, record.deployment_id, record.digest, now, events=False
        ):
            changed[device_id] = None
    add_event(
        tx,
        tenant,
        "deployment.applied",
        None,
        {
            "deployments": [{"deploymentId": r.deployment_id, "digest": r.digest} for r in records],
            "devices": list(devices),
            "changed": list(changed),
        },
        now,
    )
    return records


async def unassign(tx: Tx, tenant: str, device_id: str, deployment_id: str, now: float) -> None:
    status = await tx.conn.execute(
        "DELETE FROM assignments WHERE tenant = $1 AND device_id = $2 AND deployment_id = $3",
        tenant,
        device_id,
        deployment_id,
    )
    if not affected(status):
        raise NotFound(f"deployment {deployment_id!r} is not assigned to device {device_id!r}")
    add_event(tx, tenant, "deployment.unassigned", device_id, {"deploymentId": deployment_id}, now)


async def list_assignments(tx: Tx, tenant: str, device_id: str | None) -> list[AssignmentRecord]:
    columns = "tenant, device_id, deployment_id, digest, assigned_at"
    if device_id is None:
        rows = await tx.conn.fetch(
            f"SELECT {columns} FROM assignments WHERE tenant = $1"
            " ORDER BY device_id, deployment_id",
            tenant,
        )
    else:
        rows = await tx.conn.fetch(
            f"SELECT {columns} FROM assignments WHERE tenant = $1 AND device_id = $2"
            " ORDER BY deployment_id",
            tenant,
            device_id,
        )
    return [AssignmentRecord(*r) for r in rows]


# -- manifests -------------------------------------------------------------------------------

_MANIFEST_COLUMNS = "tenant, device_id, version, manifest, signature, created"


def _manifest(row: asyncpg.Record) -> ManifestRecord:
    return ManifestRecord(row[0], row[1], row[2], bytes(row[3]), bytes(row[4]), row[5])


async def put_manifests(
    tx: Tx,
    tenant: str,
    items: Sequence[tuple[str, int, bytes, bytes]],
    now: float,
) -> None:
    """``put_manifest`` for many devices in one transaction: all of them or none. The first
    item at fault decides the error, as if they were stored one by one."""
    if not items:
        return
    device_ids = list(dict.fromkeys(item[0] for item in items))
    # Several controllers may build the next manifest of one device at once: lock the devices'
    # rows first (in one order, so two batches never deadlock), then read their latest versions
    # in a statement of its own, whose snapshot sees whatever the lock waited for.
    await tx.conn.execute(
        "SELECT 1 FROM devices WHERE tenant = $1 AND device_id = ANY($2::text[])"
        " ORDER BY device_id FOR UPDATE",
        tenant,
        device_ids,
    )
    known = await tx.conn.fetch(
        "SELECT d.device_id, (SELECT max(version) FROM manifests m"
        "  WHERE m.tenant = d.tenant AND m.device_id = d.device_id)"
        " FROM devices d WHERE d.tenant = $1 AND d.device_id = ANY($2::text[])",
        tenant,
        device_ids,
    )
    latest: dict[str, int | None] = {r[0]: r[1] for r in known}
    issued: dict[tuple[str, str], int] = {}
    for device_id, version, manifest, _ in items:
        if device_id not in latest:
            raise device_not_found(device_id)
        current = latest[device_id]
        if current is not None and version <= current:
            raise VersionConflict(
                f"manifest version {version} for device {device_id!r} is not above the latest"
                f" ({current})"
            )
        latest[device_id] = version
        for deployment_id in issued_deployment_ids(manifest):
            issued.setdefault((device_id, deployment_id), version)
    await tx.conn.execute(
        f"INSERT INTO manifests ({_MANIFEST_COLUMNS})"
        " SELECT $1, d, v, m, s, $6 FROM unnest($2::text[], $3::int8[], $4::bytea[], $5::bytea[])"
        " AS u(d, v, m, s)",
        tenant,
        [i[0] for i in items],
        [i[1] for i in items],
        [bytes(i[2]) for i in items],
        [bytes(i[3]) for i in items],
        now,
    )
    if issued:
        # a device's versions only grow, so the first version that listed a deployment is the
        # one already recorded, or the lowest of this batch
        keys = list(issued)
        await tx.conn.execute(
            "INSERT INTO issued_deployments (tenant, device_id, deployment_id, first_version)"
            " SELECT $1, d, p, v FROM unnest($2::text[], $3::text[], $4::int8[]) AS u(d, p, v)"
            " ON CONFLICT (tenant, device_id, deployment_id) DO NOTHING",
            tenant,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [issued[k] for k in keys],
        )
    for device_id, version, _, _ in items:
        add_event(tx, tenant, "manifest.created", device_id, {"manifestVersion": version}, now)


async def latest_manifest(tx: Tx, tenant: str, device_id: str) -> ManifestRecord | None:
    row = await tx.conn.fetchrow(
        f"SELECT {_MANIFEST_COLUMNS} FROM manifests WHERE tenant = $1 AND device_id = $2"
        " ORDER BY version DESC LIMIT 1",
        tenant,
        device_id,
    )
    return None if row is None else _manifest(row)


async def latest_manifests(
    tx: Tx, tenant: str, device_ids: Sequence[str]
) -> dict[str, ManifestRecord]:
    """The newest manifest of each of ``device_ids`` that has one, in one read."""
    rows = await tx.conn.fetch(
        f"SELECT DISTINCT ON (device_id) {_MANIFEST_COLUMNS} FROM manifests"
        " WHERE tenant = $1 AND device_id = ANY($2::text[]) ORDER BY device_id, version DESC",
        tenant,
        list(dict.fromkeys(device_ids)),
    )
    found = {r[1]: _manifest(r) for r in rows}
    return {d: found[d] for d in device_ids if d in found}
