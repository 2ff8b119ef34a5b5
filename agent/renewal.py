"""Certificate renewal: at two thirds of its lifetime the agent renews its certificate over
EST ``simplereenroll`` (mutual TLS with the current pair, a new key born on the device), then
reconnects with the new pair. The old pair stays in place until the new one is stored.

A failed attempt is retried (every tenth of the time left, between 1 and 30 seconds) until the
certificate expires; a certificate already expired cannot renew itself: the device must be
enrolled again with a new bootstrap token, and the agent says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from agent.enroll import EnrolError, est_server, reenroll
from margo_stream.errors import IdentityError
from margo_stream.identity.trust import read_certificates

log = logging.getLogger("margo.agent.renewal")

RENEW_AT = 2 / 3


def renew_time(not_before: float, not_after: float) -> float:
    return not_before + RENEW_AT * (not_after - not_before)


async def renewal_loop(
    identity: Path, tenant: str, device_id: str, on_renewed: Callable[[], None]
) -> None:
    """Run for the agent's life; ``on_renewed()`` after each new pair is stored."""
    server = est_server(identity)
    if server is None:
        log.info("identity %s was not enrolled over EST: it is renewed by margo-certs", identity)
        return
    while True:
        try:
            cert = read_certificates(identity / "cert.pem")[0]
        except IdentityError as exc:
            log.error("cannot renew: %s", exc)
            return
        not_before = cert.not_valid_before_utc.timestamp()
        not_after = cert.not_valid_after_utc.timestamp()
        now = time.time()
        if now >= not_after:
            log.error(
                "the certificate of %s/%s expired at %s: it cannot renew itself; enrol this "
                "device again with a new bootstrap token (margo-certs bootstrap, then "
                "margo-agent enroll)",
                tenant,
                device_id,
                cert.not_valid_after_utc.isoformat(),
                extra={"event": "certificate-expired"},
            )
            return
        due = renew_time(not_before, not_after)
        if now < due:
            await anyio.sleep(due - now)
            continue
        try:
            new = await reenroll(identity, server, tenant, device_id)
        except (EnrolError, OSError) as exc:  # the controller, the network or the disk
            retry = min(30.0, max(1.0, (not_after - now) / 10))
            log.warning(
                "certificate renewal failed (retrying in %.0f s): %s",
                retry,
                exc,
                extra={"event": "renewal-failed", "reason": str(exc)},
            )
            await anyio.sleep(retry)
            continue
        log.info(
            "certificate renewed with a new key, valid until %s",
            new.not_valid_after_utc.isoformat(),
            extra={"event": "certificate-renewed"},
        )
        on_renewed()


__all__ = ["renew_time", "renewal_loop"]
