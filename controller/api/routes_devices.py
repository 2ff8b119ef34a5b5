"""``/api/v1/devices``: the tenant's devices, live facts from the session registry and, with
several controllers on one store, where each device is connected (its lease); operators assign
a device's labels (``PATCH .../labels``, see ``controller.labels``)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from controller.allowlist import UNKNOWN, AllowList
from controller.api.routes_common import context, json_body, rfc3339, tenant_of
from controller.labels import LabelError
from controller.ports import Holder
from controller.problems import Problem
from controller.registry import SessionView
from controller.store.base import DeviceRecord
from margo_stream.errors import NotFound


def device_item(
    tenant: str,
    record: DeviceRecord | None,
    view: SessionView | None,
    allowlist: AllowList | None = None,
    holder: Holder | None = None,
) -> dict[str, Any]:
    """One device as the API shows it. ``controller`` is the controller instance holding its
    session (``holder``: a valid lease, in any process sharing the store), ``connected``
    whether one does, ``transport`` its carrier (``quic`` or ``tcp``; null while not
    connected); while connected here, ``last_seen``, ``remote`` and ``manifest_version`` come
    from the live session; ``state`` (allowed, revoked, unknown) and ``not_after`` (of the identity's
    newest certificate) from the allow-list; the rest from the store."""
    controller = holder.instance if holder is not None else None
    connected = view is not None or bool(controller)
    last_seen = view.last_seen if view is not None else (record.last_seen if record else None)
    manifest_version = record.manifest_version if record else None
    if view is not None and view.manifest_version is not None:
        manifest_version = view.manifest_version
    device_id = record.device_id if record is not None else view.device_id  # type: ignore[union-attr]
    item: dict[str, Any] = {
        "id": device_id,
        "tenant": tenant,
        "connected": connected,
        "controller": (controller or None) if connected else None,
        "capabilities": record.capabilities if record else {},
        "labels": record.labels if record else {},
        "reported_labels": record.reported_labels if record else {},
        "last_seen": rfc3339(last_seen),
        "first_seen": rfc3339(record.first_seen if record else view.connected_since),  # type: ignore[union-attr]
        "connection_count": record.connection_count if record else 1,
        "manifest_version": manifest_version,
        "stats": record.stats if record else {},
    }
    identity = allowlist.get(tenant, device_id) if allowlist is not None else None
    item["state"] = identity.state if identity is not None else UNKNOWN
    item["not_after"] = rfc3339(identity.not_after) if identity is not None else None
    if view is not None:
        item["transport"] = view.transport
    else:
        item["transport"] = holder.transport if holder is not None and connected else None
    if view is not None:
        item["remote"] = view.remote
        item["connected_since"] = rfc3339(view.connected_since)
    elif connected and record is not None and record.remote:
        item["remote"] = record.remote  # connected to another controller of the cluster
    return item


async def list_devices(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    ctx = context(request)
    records = {r.device_id: r for r in await ctx.store.list_devices(tenant)}
    live = {v.device_id: v for v in ctx.registry.of_tenant(tenant)}
    holders = await ctx.registry.holders(tenant)
    allowlist = ctx.identities.allowlist if ctx.identities is not None else None
    items = [
        device_item(
            tenant, records.get(device_id), live.get(device_id), allowlist, holders.get(device_id)
        )
        for device_id in sorted(records.keys() | live.keys())
    ]
    return JSONResponse({"items": items})


async def get_device(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    ctx = context(request)
    device_id = request.path_params["device_id"]
    view = ctx.registry.get(tenant, device_id)
    try:
        record = await ctx.store.get_device(tenant, device_id)
    except NotFound:
        if view is None:
            raise
        record = None  # connected a moment ago; the store has not caught up yet
    holders = await ctx.registry.holders(tenant, [device_id])
    allowlist = ctx.identities.allowlist if ctx.identities is not None else None
    return JSONResponse(device_item(tenant, record, view, allowlist, holders.get(device_id)))


async def patch_labels(request: Request) -> JSONResponse:
    """``{"labels": {key: value | null}}`` merged into the operator labels (null removes the
    key); answers with the device. Selectors match these labels on the next apply."""
    tenant = tenant_of(request)
    ctx = context(request)
    device_id = request.path_params["device_id"]
    changes = (await json_body(request)).get("labels")
    if not isinstance(changes, dict) or not changes:
        raise Problem(
            400, "'labels' must be a non-empty object of key: value or null", kind="invalid-body"
        )
    try:
        await ctx.store.update_labels(tenant, device_id, changes)
    except LabelError as exc:
        raise Problem(
            400,
            str(exc),
            kind="invalid-label",
            errors=[{"field": f"labels.{exc.key}", "message": str(exc)}],
        ) from None
    record = await ctx.store.get_device(tenant, device_id)
    allowlist = ctx.identities.allowlist if ctx.identities is not None else None
    view = ctx.registry.get(tenant, device_id)
    holders = await ctx.registry.holders(tenant, [device_id])
    return JSONResponse(device_item(tenant, record, view, allowlist, holders.get(device_id)))


def routes() -> list[Route]:
    # ``:path`` because Margo device ids may contain '/'; the sub-resource routes of a device
    # are registered before these so they win.
    return [
        Route("/api/v1/devices/{device_id:path}/labels", patch_labels, methods=["PATCH"]),
        Route("/api/v1/devices", list_devices, methods=["GET"]),
        Route("/api/v1/devices/{device_id:path}", get_device, methods=["GET"]),
    ]
