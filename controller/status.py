"""Deployment status events from devices: stored in Margo's deployment-status shape, acked by
sequence number once stored. The store keeps the newest status per deployment (an older or
repeated sequence number changes nothing) and turns state changes into operator events."""

from __future__ import annotations

from typing import Any

from controller.batching import WriteBatcher
from controller.service import Controller
from controller.session import ControllerSession
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import StreamKind
from margo_stream.transport.connection import MessageStream


def margo_status(device_id: str, s: m.Status) -> dict[str, Any]:
    """Our wire status in the shape of Margo's ``DeploymentStatus`` (deployment-status.md)."""
    status: dict[str, Any] = {"state": s.state}
    if s.error is not None:
        status["error"] = s.error.model_dump()
    return {
        "deploymentId": s.deployment_id,
        "deviceId": device_id,
        "adoptedManifestVersion": s.manifest_version,
        "status": status,
        "components": [c.model_dump(exclude_none=True) for c in s.components],
    }


def install(ctl: Controller) -> None:
    def handle(session: ControllerSession, stream: MessageStream) -> None:
        def on_message(message: Any) -> None:
            if isinstance(message, m.Status):
                ctl.spawn(store_and_ack, session, stream, message)

        stream.on_message = on_message

    writes: WriteBatcher[tuple[str, str, dict[str, Any], int], bool] = WriteBatcher(
        ctl.store.put_status_batch
    )

    async def store_and_ack(session: ControllerSession, stream: MessageStream, s: m.Status) -> None:
        await writes.submit(
            (session.tenant, session.device_id, margo_status(session.device_id, s), s.seq)
        )
        if session.conn.closed is None and not stream.ended:
            stream.send(m.StatusAck(seq=s.seq))

    ctl.stream_handlers[StreamKind.STATUS] = handle
