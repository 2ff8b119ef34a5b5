"""Reaching a device's live session for an operator request (a terminal, a log), or why not.

One answer for every feature that opens a stream to a device on an operator's behalf: the
session when this controller holds it; else ``Unreachable`` saying whether the device does not
exist, is not connected, or is held by another controller of the cluster (its id and operator
API, where the request can be made instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.ports import DeviceLink
from controller.registry import SessionRegistry
from controller.store.base import Store
from margo_stream.errors import NotFound


@dataclass(frozen=True, slots=True)
class Unreachable:
    kind: str  # not-found, not-connected, elsewhere
    reason: str
    api: str | None = None  # elsewhere: the holder's operator API


async def reach(
    registry: SessionRegistry, store: Store, tenant: str, device_id: str, there: str
) -> DeviceLink | Unreachable:
    """The device's session here, or why not; ``there`` says what to do at the holder's API
    (e.g. "open the session")."""
    session = registry.link(tenant, device_id)
    if session is not None:
        return session
    try:
        await store.get_device(tenant, device_id)
    except NotFound:
        return Unreachable("not-found", f"no device {device_id!r}")
    elsewhere = await registry.held_elsewhere(tenant, device_id)
    if elsewhere is not None:
        instance, api = elsewhere
        return Unreachable(
            "elsewhere",
            f"device {device_id!r} is connected to controller {instance}"
            + (f": {there} through its API at {api}" if api else ""),
            api,
        )
    return Unreachable("not-connected", f"device {device_id!r} is not connected")
