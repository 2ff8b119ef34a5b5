"""SQLite store, part: desired state (blobs, deployments, assignments, manifests). Runs on the
worker thread inside the caller's transaction. Storing a manifest records which deployments it
issued to the device (``sqlite_statuses.record_issued``): what the device may report on.
"""

from __future__ import annotations

from collections.abc import Sequence

from controller.store.base import (
    AssignmentRecord,
    DeploymentDraft,
    DeploymentRecord,
    ManifestRecord,
    VersionConflict,
)
from controller.store.sqlite_devices import require_device
from controller.store.sqlite_events import StoreConnection, add_event
from controller.store.sqlite_statuses import per_deployment, record_issued
from margo_stream.errors import NotFound
from margo_stream.state.digest import sha256_digest

# -- blobs -----------------------------------------------------------------------------------


def put_blob(
    conn: StoreConnection, tenant: str, data: bytes, digest: str | None, now: float
) -> str:
    actual = sha256_digest(data)
    if digest is not None and digest != actual:
        raise ValueError(f"blob digest mismatch: given {digest}, content is {actual}")
    conn.execute(
        "INSERT OR IGNORE INTO blobs (tenant, digest, data, created) VALUES (?, ?, ?, ?)",
        (tenant, actual, bytes(data), now),
    )
    return actual


def get_blob(conn: StoreConnection, tenant: str, digest: str) -> bytes:
    row = conn.execute(
        "SELECT data FROM blobs WHERE tenant = ? AND digest = ?", (tenant, digest)
    ).fetchone()
    if row is None:
        raise NotFound(f"blob {digest} not found")
    return bytes(row[0])


def has_blob(conn: StoreConnection, tenant: str, digest: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM blobs WHERE tenant = ? AND digest = ?", (tenant, digest)
    ).fetchone()
    return row is not None


def missing_blobs(conn: StoreConnection, tenant: str, digests: Sequence[str]) -> list[str]:
    return [d for d in dict.fromkeys(digests) if not has_blob(conn, tenant, d)]


# -- deployments -----------------------------------------------------------------------------

_DEPLOYMENT_COLUMNS = (
    "tenant, deployment_id, digest, name, profile, created, signature, certificate"
)


def put_deployment(
    conn: StoreConnection,
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
    digest = put_blob(conn, tenant, document, None, now)
    # Re-applying an older version makes it the newest again: ``created`` is when this
    # version was last applied. Re-applying the newest version unchanged keeps its signature
    # (an idempotent apply changes nothing a device sees); bringing an older version back
    # takes the new signature (devices refuse the old one as older than what they hold).
    newest = conn.execute(
        "SELECT digest, signature FROM deployments WHERE tenant = ? AND deployment_id = ?"
        " ORDER BY created DESC LIMIT 1",
        (tenant, deployment_id),
    ).fetchone()
    if newest is not None and newest[0] == digest and newest[1] is not None:
        signature, certificate = None, None
    conn.execute(
        "INSERT INTO deployments (tenant, deployment_id, digest, name, profile, created,"
        " signature, certificate) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (tenant, deployment_id, digest) DO UPDATE SET"
        " name = excluded.name, profile = excluded.profile, created = excluded.created,"
        " signature = coalesce(excluded.signature, deployments.signature),"
        " certificate = coalesce(excluded.certificate, deployments.certificate)",
        (tenant, deployment_id, digest, name, profile, now, signature, certificate),
    )
    return get_deployment(conn, tenant, deployment_id, digest)


def get_deployment(
    conn: StoreConnection, tenant: str, deployment_id: str, digest: str | None
) -> DeploymentRecord:
    if digest is None:
        row = conn.execute(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments"
            " WHERE tenant = ? AND deployment_id = ? ORDER BY created DESC LIMIT 1",
            (tenant, deployment_id),
        ).fetchone()
    else:
        row = conn.execute(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments"
            " WHERE tenant = ? AND deployment_id = ? AND digest = ?",
            (tenant, deployment_id, digest),
        ).fetchone()
    if row is None:
        what = deployment_id if digest is None else f"{deployment_id}@{digest}"
        raise NotFound(f"deployment {what!r} not found")
    return DeploymentRecord(*row)


def list_deployments(conn: StoreConnection, tenant: str) -> list[DeploymentRecord]:
    rows = conn.execute(
        f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments d WHERE tenant = ? AND created = ("
        " SELECT MAX(created) FROM deployments e"
        " WHERE e.tenant = d.tenant AND e.deployment_id = d.deployment_id)"
        " ORDER BY deployment_id",
        (tenant,),
    ).fetchall()
    seen: dict[str, DeploymentRecord] = {}
    for row in rows:  # two versions created in the same instant: keep one
        seen.setdefault(row[1], DeploymentRecord(*row))
    return list(seen.values())


# -- assignments -----------------------------------------------------------------------------


def assign(
    conn: StoreConnection,
    tenant: str,
    device_ids: Sequence[str],
    deployment_id: str,
    digest: str,
    now: float,
    *,
    events: bool = True,
) -> list[str]:
    """Assign the deployment version to the devices; returns the devices it changed."""
    get_deployment(conn, tenant, deployment_id, digest)
    for device_id in device_ids:
        require_device(conn, tenant, device_id)
    changed = []
    for device_id in device_ids:
        row = conn.execute(
            "SELECT digest FROM assignments"
            " WHERE tenant = ? AND device_id = ? AND deployment_id = ?",
            (tenant, device_id, deployment_id),
        ).fetchone()
        if row is not None and row[0] == digest:
            continue
        conn.execute(
            "INSERT INTO assignments (tenant, device_id, deployment_id, digest, assigned_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, device_id, deployment_id)"
            " DO UPDATE SET digest = excluded.digest, assigned_at = excluded.assigned_at",
            (tenant, device_id, deployment_id, digest, now),
        )
        changed.append(device_id)
        if events:
            add_event(
                conn,
                tenant,
                "deployment.assigned",
                device_id,
                {"deploymentId": deployment_id, "digest": digest},
                now,
            )
    return changed


def apply(
    conn: StoreConnection,
    tenant: str,
    blobs: Sequence[bytes],
    deployments: Sequence[DeploymentDraft],
    devices: Sequence[str],
    now: float,
) -> list[DeploymentRecord]:
    """Blobs, deployment versions and assignments of one apply, with one event (the caller's
    transaction makes it all or nothing)."""
    for blob in blobs:
        put_blob(conn, tenant, blob, None, now)
    records = []
    changed: dict[str, None] = {}
    for draft in deployments:
        record = put_deployment(
            conn,
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
        for device_id in assign(
            conn, tenant, devices, record.deployment_id, record.digest, now, events=False
        ):
            changed[device_id] = None
    add_event(
        conn,
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


def unassign(
    conn: StoreConnection, tenant: str, device_id: str, deployment_id: str, now: float
) -> None:
    cur = conn.execute(
        "DELETE FROM assignments WHERE tenant = ? AND device_id = ? AND deployment_id = ?",
        (tenant, device_id, deployment_id),
    )
    if cur.rowcount == 0:
        raise NotFound(f"deployment {deployment_id!r} is not assigned to device {device_id!r}")
    add_event(
        conn, tenant, "deployment.unassigned", device_id, {"deploymentId": deployment_id}, now
    )


def list_assignments(
    conn: StoreConnection, tenant: str, device_id: str | None
) -> list[AssignmentRecord]:
    rows = per_deployment(
        conn,
        "tenant, device_id, deployment_id, digest, assigned_at",
        "assignments",
        tenant,
        device_id,
    )
    return [AssignmentRecord(*r) for r in rows]


# -- manifests -------------------------------------------------------------------------------


def put_manifest(
    conn: StoreConnection,
    tenant: str,
    device_id: str,
    version: int,
    manifest: bytes,
    signature: bytes,
    now: float,
) -> None:
    require_device(conn, tenant, device_id)
    latest = latest_manifest(conn, tenant, device_id)
    if latest is not None and version <= latest.version:
        raise VersionConflict(
            f"manifest version {version} for device {device_id!r} is not above the latest"
            f" ({latest.version})"
        )
    conn.execute(
        "INSERT INTO manifests (tenant, device_id, version, manifest, signature, created)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (tenant, device_id, version, bytes(manifest), bytes(signature), now),
    )
    record_issued(conn, tenant, device_id, version, manifest)
    add_event(conn, tenant, "manifest.created", device_id, {"manifestVersion": version}, now)


def latest_manifest(conn: StoreConnection, tenant: str, device_id: str) -> ManifestRecord | None:
    row = conn.execute(
        "SELECT tenant, device_id, version, manifest, signature, created FROM manifests"
        " WHERE tenant = ? AND device_id = ? ORDER BY version DESC LIMIT 1",
        (tenant, device_id),
    ).fetchone()
    if row is None:
        return None
    return ManifestRecord(row[0], row[1], row[2], bytes(row[3]), bytes(row[4]), row[5])


def put_manifests(
    conn: StoreConnection,
    tenant: str,
    items: Sequence[tuple[str, int, bytes, bytes]],
    now: float,
) -> None:
    """``put_manifest`` for many devices in one transaction: all of them or none."""
    for device_id, version, manifest, signature in items:
        put_manifest(conn, tenant, device_id, version, manifest, signature, now)


def latest_manifests(
    conn: StoreConnection, tenant: str, device_ids: Sequence[str]
) -> dict[str, ManifestRecord]:
    """The newest manifest of each of ``device_ids`` that has one."""
    return {d: m for d in device_ids if (m := latest_manifest(conn, tenant, d)) is not None}
