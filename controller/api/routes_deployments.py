"""``/api/v1/deployments``: apply Margo deployment documents to devices, list what each device
runs, remove a deployment from a device.

Applying stores each document's exact bytes as a content-addressed blob, records the
deployment version and assigns it to the target devices; the controller's desired-state push
(``ApiContext.desired``) then builds, signs and sends the new manifests. A deployment is
removed from a device by unassigning it: it leaves the device's next manifest, which is how
Margo deletes (never by a 404).

Device constraints (``deviceConstraints``, and a ``wasm`` profile's need for the wasm
runtime): a target whose reported capabilities do not satisfy a deployment is still assigned
it, but the desired-state builder leaves it out of that device's manifest; the apply answer
lists it under ``skipped: [{device, deploymentId, reason}]`` and the listing shows it as
``failed`` with error code ``constraint-unmet`` naming the constraint.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
from collections.abc import Sequence
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controller.api.apply_authority import check_operator, check_signatures
from controller.api.document_intake import file_blobs, read_documents_off_loop
from controller.api.routes_common import (
    ApiContext,
    context,
    json_body,
    rfc3339,
    tenant_of,
)
from controller.document_cache import CachedDocument
from controller.labels import selector_matches
from controller.problems import Problem
from controller.store.base import AssignmentRecord, DeploymentDraft, DeviceRecord, StatusRecord
from margo_stream.errors import DocumentError, NotFound
from margo_stream.identity.envelope import canonical
from margo_stream.state.constraints import unmet
from margo_stream.state.digest import sha256_digest
from margo_stream.state.documents import Deployment, parse_deployment
from margo_stream.state.status import status_from_margo, status_to_margo

FEW_TARGETS = 16  # an apply to at most this many devices answers after its pushes left
log = logging.getLogger("margo.controller.api")


async def _targets(
    ctx: ApiContext, tenant: str, body: dict[str, Any], parsed: list[Deployment]
) -> list[str]:
    devices = body.get("devices") or []
    selector = body.get("selector") or {}
    if not isinstance(devices, list) or not all(isinstance(d, str) and d for d in devices):
        raise Problem(400, "'devices' must be a list of device ids", kind="invalid-body")
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        raise Problem(400, "'selector' must map label names to values", kind="invalid-body")
    targets: dict[str, None] = {}
    for device_id in devices:
        await ctx.store.get_device(tenant, device_id)  # NotFound before anything is written
        targets[device_id] = None
    if selector:
        for record in await ctx.store.list_devices(tenant):
            # operator labels only; ``reported.<key>`` asks for the device's own claim
            if selector_matches(selector, record.labels, record.reported_labels):
                targets[record.device_id] = None
    if not devices and not selector:
        named = {d.device_id for d in parsed if d.device_id}
        if not named:
            raise Problem(
                400,
                "no target devices: give 'devices', a 'selector', or metadata.deviceId in the"
                " documents",
                kind="no-targets",
            )
        for device_id in sorted(named):
            if device_id.endswith("/*"):
                raise Problem(
                    400,
                    f"metadata.deviceId {device_id!r} is a pattern; name devices explicitly",
                    kind="no-targets",
                )
            await ctx.store.get_device(tenant, device_id)
            targets[device_id] = None
    return list(targets)


async def apply_deployments(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    ctx = context(request)
    body = await json_body(request)
    texts = body.get("documents")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise Problem(
            400, "'documents' must be a non-empty list of YAML texts", kind="invalid-body"
        )
    # the operator's certificate first (cheap): only a certified deployer makes us read YAML
    claim = None
    if ctx.roots is not None:
        claim = check_operator(body, ctx.roots.chain(tenant), dt.datetime.now(dt.UTC))
    docs = await read_documents_off_loop(texts, ctx.workers())
    ids = [d.deployment_id for _, d in docs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DocumentError(f"deployment id {duplicates[0]!r} appears twice in one request")

    decoded = await file_blobs(body, docs, ctx.store, tenant)

    authority = None
    if claim is not None:
        authority = check_signatures(claim, docs, dt.datetime.now(dt.UTC))
        decoded.append(authority.certificate)
    targets = await _targets(ctx, tenant, body, [d for _, d in docs])
    drafts = []
    for data, dep in docs:
        sig = authority.signatures[sha256_digest(data)] if authority else None
        drafts.append(
            DeploymentDraft(
                deployment_id=dep.deployment_id,
                document=data,
                name=dep.name,
                profile=str(dep.profile),
                signature=canonical(sig).decode() if sig else None,
                certificate=authority.certificate_digest if authority else None,
            )
        )
    records = await ctx.store.apply(tenant, blobs=decoded, deployments=drafts, devices=targets)
    for record, (_, dep) in zip(records, docs, strict=True):
        # what the store kept (an unchanged re-apply keeps its first signature)
        kept = json.loads(record.signature) if record.signature else None
        ctx.documents.put(tenant, record.digest, CachedDocument(dep, kept, record.certificate))
    applied = [
        {
            "deploymentId": r.deployment_id,
            "digest": r.digest,
            "name": r.name,
            "profile": r.profile,
        }
        for r in records
    ]
    stored = [data for data, _ in docs] + decoded
    notified = await _notify(ctx, tenant, targets, stored)
    if notified and len(targets) <= FEW_TARGETS:
        await anyio.lowlevel.checkpoint()  # the few pushes just scheduled leave before the answer
    skipped = _skipped(targets, [d for _, d in docs], await _devices(ctx, tenant, docs))
    notes = [{"deploymentId": d.deployment_id, "note": n} for _, d in docs for n in d.notes]
    return JSONResponse(
        {
            "deployments": applied,
            "devices": targets,
            "notified": notified,
            "skipped": skipped,
            "notes": notes,
        }
    )


def _gated(dep: Deployment) -> bool:
    return dep.constraints is not None or str(dep.profile) == "wasm"


async def _devices(
    ctx: ApiContext, tenant: str, docs: list[tuple[bytes, Deployment]]
) -> dict[str, DeviceRecord]:
    """The tenant's devices, read only when a deployment has constraints."""
    if not any(_gated(d) for _, d in docs):
        return {}
    return {r.device_id: r for r in await ctx.store.list_devices(tenant)}


def _unmet(dep: Deployment, record: DeviceRecord | None) -> str | None:
    if not _gated(dep):
        return None
    caps, labels = (record.capabilities, record.reported_labels) if record else ({}, {})
    return unmet(dep.constraints, str(dep.profile), caps, labels)


def _skipped(
    targets: list[str], parsed: list[Deployment], devices: dict[str, DeviceRecord]
) -> list[dict[str, str]]:
    """The targets that do not get a deployment, and the constraint each fails."""
    out = []
    for device_id in targets:
        for dep in parsed:
            reason = _unmet(dep, devices.get(device_id))
            if reason is not None:
                out.append(
                    {"device": device_id, "deploymentId": dep.deployment_id, "reason": reason}
                )
    return out


async def _document(ctx: ApiContext, tenant: str, a: AssignmentRecord) -> Deployment | None:
    """The assigned version's parsed document (the shared cache, else read and parse it)."""
    cached = ctx.documents.get(tenant, a.digest)
    if cached is not None:
        return cached.document
    try:
        record = await ctx.store.get_deployment(tenant, a.deployment_id, a.digest)
        data = await ctx.store.get_blob(tenant, a.digest)
        source = f"deployment {a.deployment_id}"
        dep = await anyio.to_thread.run_sync(
            functools.partial(parse_deployment, data, source=source)
        )
    except (NotFound, DocumentError):
        return None
    signature = json.loads(record.signature) if record.signature else None
    ctx.documents.put(tenant, a.digest, CachedDocument(dep, signature, record.certificate))
    return dep


async def _constraint_failures(
    ctx: ApiContext, tenant: str, assignments: list[AssignmentRecord]
) -> dict[tuple[str, str], str]:
    """(device, deployment) -> the unmet constraint, for assignments left out of manifests."""
    devices: dict[str, DeviceRecord] | None = None
    out: dict[tuple[str, str], str] = {}
    for a in assignments:
        dep = await _document(ctx, tenant, a)
        if dep is None or not _gated(dep):
            continue
        if devices is None:
            devices = {r.device_id: r for r in await ctx.store.list_devices(tenant)}
        reason = _unmet(dep, devices.get(a.device_id))
        if reason is not None:
            out[(a.device_id, a.deployment_id)] = reason
    return out


async def _notify(
    ctx: ApiContext, tenant: str, device_ids: list[str], blobs: Sequence[bytes] = ()
) -> bool:
    if ctx.desired is None or not device_ids:
        return False
    try:
        await ctx.desired.desired_changed(tenant, list(device_ids), blobs=blobs)
    except Exception:
        # The change is stored; the push happens on the next change or reconnect.
        log.exception("desired-state push failed for tenant %s", tenant)
        return False
    return True


def deployment_item(
    device_id: str, assignment: AssignmentRecord | None, status: StatusRecord | None
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "deploymentId": (assignment or status).deployment_id,  # type: ignore[union-attr]
        "device": device_id,
        "digest": assignment.digest if assignment else None,
        "assigned": assignment is not None,
        "state": "pending",
        "components": [],
        "manifestVersion": None,
        "error": None,
        "updated_at": rfc3339(assignment.assigned_at if assignment else None),
    }
    if status is not None:
        item["updated_at"] = rfc3339(status.updated_at)
        try:
            typed = status_from_margo(status.status)
        except ValueError as exc:
            log.warning(
                "stored status of %s on %s is unreadable: %s", item["deploymentId"], device_id, exc
            )
            item["error"] = {
                "code": "unreadable-status",
                "source": "controller",
                "message": str(exc),
            }
            return item
        doc = status_to_margo(device_id, typed)
        item["state"] = typed.state.value
        item["components"] = doc["components"]
        item["manifestVersion"] = typed.manifest_version
        item["error"] = doc["status"].get("error")
    return item


async def list_deployments(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    ctx = context(request)
    device_id = request.query_params.get("device") or None
    if device_id is not None:
        await ctx.store.get_device(tenant, device_id)
    assignments = {
        (a.device_id, a.deployment_id): a
        for a in await ctx.store.list_assignments(tenant, device_id)
    }
    statuses = {
        (s.device_id, s.deployment_id): s for s in await ctx.store.list_statuses(tenant, device_id)
    }
    items = [
        deployment_item(key[0], assignments.get(key), statuses.get(key))
        for key in sorted(assignments.keys() | statuses.keys())
    ]
    failures = await _constraint_failures(ctx, tenant, list(assignments.values()))
    for item in items:
        reason = failures.get((item["device"], item["deploymentId"]))
        if reason is not None:  # left out of the device's manifest: it never gets it
            item["state"] = "failed"
            item["error"] = {"code": "constraint-unmet", "source": "controller", "message": reason}
    return JSONResponse({"items": items})


async def delete_deployment(request: Request) -> Response:
    tenant = tenant_of(request)
    ctx = context(request)
    device_id = request.path_params["device_id"]
    deployment_id = request.path_params["deployment_id"]
    await ctx.store.get_device(tenant, device_id)
    await ctx.store.unassign(tenant, device_id, deployment_id)
    await _notify(ctx, tenant, [device_id])
    return Response(status_code=204)


def routes() -> list[Route]:
    return [
        Route("/api/v1/deployments", list_deployments, methods=["GET"]),
        Route("/api/v1/deployments", apply_deployments, methods=["POST"]),
        Route(
            "/api/v1/devices/{device_id:path}/deployments/{deployment_id}",
            delete_deployment,
            methods=["DELETE"],
        ),
    ]
