"""No device connection outlives its certificate or the maximum connection age.

Each admitted QUIC connection gets one timer: at the certificate's ``not_after`` the controller
closes it with ``IDENTITY_REFUSED`` ("certificate expired"), and at ``--max-connection-age``
(jittered by +-10% so a fleet that connected together does not reconnect together) with
``NO_ERROR`` ("maximum connection age"); the agent reconnects at once, with its newest
certificate. The timer ends early when the connection closes for any other reason.
"""

from __future__ import annotations

import logging
import random
import time

import anyio

from margo_stream.identity.spiffe import DeviceIdentity
from margo_stream.protocol.codes import ErrorCode
from margo_stream.transport.channel_connection import ChannelConnection

log = logging.getLogger("margo.controller.limits")

JITTER = 0.10


def jittered(max_age: float, rng: random.Random | None = None) -> float:
    return max_age * (rng or random).uniform(1 - JITTER, 1 + JITTER)


async def close_at_limits(
    conn: ChannelConnection, identity: DeviceIdentity, max_age: float, *, now: float | None = None
) -> None:
    """Sleep until the first limit (or until ``conn`` closes), then close ``conn``."""
    now = time.time() if now is None else now
    age = jittered(max_age)
    until_expiry = identity.not_after.timestamp() - now
    if until_expiry <= age:
        delay, code = until_expiry, ErrorCode.IDENTITY_REFUSED
        reason = f"certificate expired at {identity.not_after:%Y-%m-%dT%H:%M:%SZ}"
    else:
        delay, code, reason = age, ErrorCode.NO_ERROR, f"maximum connection age ({max_age:g} s)"
    with anyio.move_on_after(max(delay, 0.0)):
        await conn.wait_closed()
        return
    if conn.closed is None:
        log.info(
            "closing %s/%s: %s",
            identity.tenant,
            identity.device_id,
            reason,
            extra={"event": "connection-limit", "reason": reason},
        )
        conn.close(code, reason)


__all__ = ["close_at_limits", "jittered"]
