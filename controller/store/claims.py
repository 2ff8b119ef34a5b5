"""What a device may claim in a deployment status, and the refusal when it claims more.

A device reports status only about what the controller told it to run, so the store accepts a
status only when both hold:

- its ``adoptedManifestVersion`` is a manifest version the controller issued to *this* device
  (a row of ``manifests``: every version ever issued is kept), and
- its deployment was *issued* to this device: listed in one of the device's manifests of that
  version or earlier (``issued_deployments``, filled as manifests are stored).

"Assigned" therefore means "within the desired states issued to the device", not "in its
assignments now": a deployment an operator removed stays issued, so the device's report of
its removal (``removing`` / ``removed``, carrying the version of the manifest that dropped it)
is accepted, while a deployment the device only guessed the name of, or a version it made up,
is refused. An assignment whose manifest was not built yet is not issued either: the device
cannot have heard of it.

Every transport stores status through the store (``put_status`` / ``put_statuses`` /
``put_status_batch``), so this one check covers them all; the store logs each refusal.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from margo_stream.protocol.codes import ErrorCode

log = logging.getLogger("margo.controller.store")

UNKNOWN_VERSION = "unknown-manifest-version"  # never issued to this device
NOT_ISSUED = "deployment-not-issued"  # not in any manifest issued to this device (up to then)


@dataclass(frozen=True, slots=True)
class StatusRefusal:
    """One refused status claim (what the log line, the REST problem and the tests name)."""

    tenant: str
    device_id: str
    deployment_id: str
    claimed_version: object  # as claimed: normally an int, whatever the document held
    reason: str  # UNKNOWN_VERSION | NOT_ISSUED

    @property
    def code(self) -> int:
        return int(ErrorCode.STATUS_REFUSED)

    def describe(self) -> str:
        if self.reason == UNKNOWN_VERSION:
            return (
                f"manifest version {self.claimed_version!r} was never issued to device "
                f"{self.device_id!r}"
            )
        return (
            f"deployment {self.deployment_id!r} was not issued to device {self.device_id!r} "
            f"(up to manifest version {self.claimed_version!r})"
        )


class StatusRefused(ValueError):
    """``put_status`` / ``put_statuses``: the status claims what the device was never issued."""

    def __init__(self, refusal: StatusRefusal) -> None:
        super().__init__(f"status refused: {refusal.describe()}")
        self.refusal = refusal


@dataclass(slots=True)
class _Window:
    start: float
    logged: int = 0
    skipped: int = 0


class RefusalLog:
    """One warning per refusal, at most ``burst`` per device per ``window`` seconds (a device
    that repeats a refused claim in a loop must not flood the log); the next line that gets
    through says how many were left out. Bounded: at most ``max_devices`` devices remembered."""

    def __init__(self, *, burst: int = 10, window: float = 60.0, max_devices: int = 4096) -> None:
        self.burst = burst
        self.window = window
        self.max_devices = max_devices
        self._windows: dict[tuple[str, str], _Window] = {}

    def __call__(self, refusal: StatusRefusal, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        key = (refusal.tenant, refusal.device_id)
        w = self._windows.get(key)
        if w is None or t - w.start >= self.window:
            if w is None and len(self._windows) >= self.max_devices:
                self._windows.clear()
            w = self._windows[key] = _Window(t, skipped=w.skipped if w is not None else 0)
        if w.logged >= self.burst:
            w.skipped += 1
            return
        w.logged += 1
        skipped, w.skipped = w.skipped, 0
        log.warning(
            "refused a status from %s/%s: %s",
            refusal.tenant,
            refusal.device_id,
            refusal.describe(),
            extra={
                "event": "status-refused",
                "code": refusal.code,
                "tenant": refusal.tenant,
                "device": refusal.device_id,
                "deployment": refusal.deployment_id,
                "claimed_version": refusal.claimed_version,
                "reason": refusal.reason,
                "suppressed": skipped,
            },
        )
