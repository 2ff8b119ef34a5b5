"""Device-facing transports other than QUIC: Margo's own pull API and two push alternatives.

margo-stream's transport is QUIC; these servers exist so the bench can compare it, on
evidence, with what a fleet would otherwise use, each carrying the same signed desired state
and the same Margo status documents out of the same ``Store``:

- ``rest_poll``: Margo rc.3's Management Interface as published (devices poll
  ``GET /api/v1/deployments`` with ``If-None-Match``), HTTP/1.1 over mutual TLS.
- ``h2_push``: one long-lived HTTP/2 connection per device; the controller pushes each new
  desired state on a response stream the device keeps open.
- ``bench.transports.mqtt``: a Mosquitto broker plus a bridge task (lives in ``bench/``).

This module holds what all of them share on the controller side: :class:`DeviceBackend`
(the store-side logic: desired state per device with its Margo projection and ETags, status
and capability documents validated once, last-seen batching) and :class:`ProblemError`
(an RFC 9457 problem detail raised anywhere and rendered by the server that caught it).

Theory of operation: a transport authenticates the peer (``tls.peer_identity``), then calls
the backend with the verified ``(tenant, device_id)`` only; nothing in a path or a payload can
name another device (a mismatch is a 403 problem).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from controller.store.base import Store
from margo_stream.errors import DocumentError, NotFound
from margo_stream.state.digest import sha256_digest
from margo_stream.state.manifest import (
    MAX_VERSION,
    Manifest,
    blob_digests,
    canonical_json,
    margo_manifest,
    parse_manifest,
)
from margo_stream.state.status import DeploymentState

log = logging.getLogger("margo.device_api")

PROBLEM_BASE = "https://docs.margo.org/specification/problem-types"
OUR_PROBLEM_BASE = "https://margo-stream.dev/problems"
PROBLEM_MEDIA_TYPE = "application/problem+json"
STATES = frozenset(s.value for s in DeploymentState)
MAX_BODY = 1 << 20


class ProblemError(Exception):
    """An RFC 9457 problem detail; ``status`` is the HTTP status code."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        kind: str | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind or title.lower().replace(" ", "-")
        self.errors = errors

    def document(self, instance: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": f"{OUR_PROBLEM_BASE}#{self.kind}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "retryable": self.status >= 500,
        }
        if instance:
            doc["instance"] = instance
        if self.errors:
            doc["errors"] = self.errors
        return doc

    def body(self, instance: str | None = None) -> bytes:
        return canonical_json(self.document(instance))


@dataclass(frozen=True, slots=True)
class Desired:
    """One device's newest signed desired state and its views."""

    tenant: str
    device_id: str
    version: int
    manifest_bytes: bytes  # the exact signed bytes
    signature: bytes
    manifest: Manifest
    margo_body: bytes  # canonical JSON of Margo rc.3's UnsignedAppStateManifest
    margo_etag: str  # digest of margo_body
    signed_etag: str  # digest of manifest_bytes

    @property
    def digests(self) -> set[str]:
        return blob_digests(self.manifest)


def _field_error(field: str, message: str) -> ProblemError:
    return ProblemError(
        400,
        "Invalid request",
        f"{field}: {message}",
        kind="invalid-request",
        errors=[{"field": field, "message": message}],
    )


def _version(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _field_error(field, "must be an integer in [1, 2^64-1]")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise _field_error(field, "must be an integer in [1, 2^64-1]")
        value = int(value)
    if not 1 <= value <= MAX_VERSION:
        raise _field_error(field, "must be an integer in [1, 2^64-1]")
    return value


def _error_obj(value: Any, field: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _field_error(field, "must be an object {code, source, message}")
    out = {}
    for key in ("code", "source", "message"):
        if key in value:
            if not isinstance(value[key], str):
                raise _field_error(f"{field}.{key}", "must be a string")
            out[key] = value[key]
    return out


def parse_json_body(body: bytes) -> Any:
    if len(body) > MAX_BODY:
        raise ProblemError(
            413,
            "Content too large",
            f"body is {len(body)} bytes, more than {MAX_BODY}",
            kind="content-too-large",
        )
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProblemError(
            400, "Invalid request", f"body is not JSON: {exc}", kind="invalid-request"
        ) from None


def validate_status(doc: Any, deployment_id: str, device_id: str) -> dict[str, Any]:
    """Margo rc.3 ``DeploymentStatusManifest``: a normalised copy, or a ``ProblemError``."""
    if not isinstance(doc, dict):
        raise _field_error("(body)", "must be a JSON object")
    for key in ("deploymentId", "adoptedManifestVersion", "status", "components"):
        if key not in doc:
            raise _field_error(key, "is required")
    if not isinstance(doc["deploymentId"], str) or not doc["deploymentId"]:
        raise _field_error("deploymentId", "must be a non-empty string")
    if doc["deploymentId"] != deployment_id:
        raise ProblemError(
            422,
            "Unprocessable content",
            f"deploymentId {doc['deploymentId'][:80]!r} differs from the path's "
            f"{deployment_id[:80]!r}",
            kind="deployment-id-mismatch",
        )
    if "deviceId" in doc and doc["deviceId"] != device_id:
        raise ProblemError(
            403,
            "Forbidden",
            "deviceId names another device than the client certificate's",
            kind="forbidden",
        )
    out: dict[str, Any] = {
        "deploymentId": deployment_id,
        "deviceId": device_id,
        "adoptedManifestVersion": _version(doc["adoptedManifestVersion"], "adoptedManifestVersion"),
    }
    status = doc["status"]
    if not isinstance(status, dict) or status.get("state") not in STATES:
        raise _field_error("status.state", f"must be one of {', '.join(sorted(STATES))}")
    out["status"] = {"state": status["state"]}
    if "error" in status:
        out["status"]["error"] = _error_obj(status["error"], "status.error")
    comps = doc["components"]
    if not isinstance(comps, list):
        raise _field_error("components", "must be an array")
    out["components"] = []
    for i, comp in enumerate(comps):
        if not isinstance(comp, dict):
            raise _field_error(f"components[{i}]", "must be an object")
        if not isinstance(comp.get("name"), str) or not comp["name"]:
            raise _field_error(f"components[{i}].name", "is required (a non-empty string)")
        if comp.get("state") not in STATES:
            raise _field_error(
                f"components[{i}].state", f"must be one of {', '.join(sorted(STATES))}"
            )
        item: dict[str, Any] = {"name": comp["name"], "state": comp["state"]}
        if "error" in comp:
            item["error"] = _error_obj(comp["error"], f"components[{i}].error")
        out["components"].append(item)
    return out


_CAP_ALLOWED = {"properties", "labels"}


def validate_capabilities(
    doc: Any, path_device_id: str, device_id: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Margo rc.3 ``DeviceCapabilitiesManifest`` -> (capability properties, string labels)."""
    if path_device_id != device_id:
        raise ProblemError(
            403,
            "Forbidden",
            f"deviceId {path_device_id[:80]!r} is not the client certificate's device",
            kind="forbidden",
        )
    if not isinstance(doc, dict):
        raise _field_error("(body)", "must be a JSON object")
    for key in doc:
        if key not in _CAP_ALLOWED and not (key.startswith("x-") and key.endswith("-extensions")):
            raise _field_error(
                key, "is not allowed (rc.3: properties, labels, x-<name>-extensions)"
            )
    props = doc.get("properties")
    if not isinstance(props, dict):
        raise _field_error("properties", "is required (an object)")
    for key in ("id", "vendor", "modelNumber", "serialNumber"):
        if not isinstance(props.get(key), str):
            raise _field_error(f"properties.{key}", "is required (a string)")
    if props["id"] != device_id:
        raise ProblemError(
            403,
            "Forbidden",
            "properties.id is not the client certificate's device",
            kind="forbidden",
        )
    labels_in = doc.get("labels", {})
    if not isinstance(labels_in, dict):
        raise _field_error("labels", "must be an object")
    labels: dict[str, str] = {}
    for key, value in labels_in.items():
        if isinstance(value, list):
            labels[key] = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            labels[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            labels[key] = str(value)
        else:
            raise _field_error(f"labels.{key}", "must be a string, number, boolean or array")
    return dict(props), labels


class DeviceBackend:
    """The store-side logic every alternative transport shares."""

    def __init__(self, store: Store, *, touch_interval: float = 5.0) -> None:
        self.store = store
        self.touch_interval = touch_interval
        self._cache: dict[tuple[str, str], Desired] = {}
        self._seen: dict[tuple[str, str], float] = {}
        self._last_seq: dict[tuple[str, str], int] = {}
        self._adopted: dict[tuple[str, str], int] = {}

    async def desired(self, tenant: str, device_id: str) -> Desired | None:
        """The newest manifest for the device (None when it has none)."""
        record = await self.store.latest_manifest(tenant, device_id)
        if record is None:
            return None
        key = (tenant, device_id)
        cached = self._cache.get(key)
        if cached is not None and cached.version == record.version:
            return cached
        try:
            manifest = parse_manifest(record.manifest)
        except DocumentError as exc:
            log.error(
                "stored manifest v%d of %s/%s is invalid: %s",
                record.version,
                tenant,
                device_id,
                exc,
            )
            raise ProblemError(
                500, "Internal error", "the stored manifest is invalid", kind="internal"
            ) from None
        if manifest.tenant != tenant or manifest.device_id != device_id:
            raise ProblemError(
                500, "Internal error", "the stored manifest names another device", kind="internal"
            )
        body = canonical_json(margo_manifest(manifest))
        desired = Desired(
            tenant,
            device_id,
            record.version,
            record.manifest,
            record.signature,
            manifest,
            body,
            sha256_digest(body),
            sha256_digest(record.manifest),
        )
        self._cache[key] = desired
        return desired

    async def blobs(self, tenant: str, digests: set[str] | list[str]) -> dict[str, bytes]:
        return {d: await self.store.get_blob(tenant, d) for d in sorted(digests)}

    def next_seq(self, tenant: str, device_id: str) -> int:
        """Status sequence numbers: microseconds of wall time, strictly increasing per device,
        so they stay ordered across controller restarts."""
        key = (tenant, device_id)
        seq = max(self._last_seq.get(key, 0) + 1, time.time_ns() // 1000)
        self._last_seq[key] = seq
        return seq

    async def _ensure_device(self, tenant: str, device_id: str, remote: str) -> None:
        try:
            await self.store.get_device(tenant, device_id)
        except NotFound:
            await self.store.device_connected(
                tenant, device_id, capabilities={}, labels={}, manifest_version=None, remote=remote
            )

    async def put_status(
        self, tenant: str, device_id: str, doc: Any, deployment_id: str, remote: str = ""
    ) -> bool:
        status = validate_status(doc, deployment_id, device_id)
        seq = self.next_seq(tenant, device_id)
        try:
            stored = await self.store.put_status(tenant, device_id, status, seq)
        except NotFound:
            await self._ensure_device(tenant, device_id, remote)
            stored = await self.store.put_status(tenant, device_id, status, seq)
        adopted = status["adoptedManifestVersion"]
        key = (tenant, device_id)
        if adopted > self._adopted.get(key, 0):
            self._adopted[key] = adopted
            try:
                await self.store.set_manifest_version(tenant, device_id, adopted)
            except NotFound:
                pass
        self.seen(tenant, device_id)
        return stored

    async def put_capabilities(
        self, tenant: str, device_id: str, path_device_id: str, doc: Any, remote: str
    ) -> bool:
        """Store the capabilities; True when the device was not known before (201)."""
        caps, labels = validate_capabilities(doc, path_device_id, device_id)
        try:
            record = await self.store.get_device(tenant, device_id)
            created, version = False, record.manifest_version
        except NotFound:
            created, version = True, None
        await self.store.device_connected(
            tenant,
            device_id,
            capabilities=caps,
            labels=labels,
            manifest_version=version,
            remote=remote,
        )
        return created

    async def connected(
        self, tenant: str, device_id: str, remote: str, manifest_version: int | None
    ) -> None:
        """A push transport's long-lived session started (capabilities kept as stored)."""
        try:
            record = await self.store.get_device(tenant, device_id)
            caps = record.capabilities
            version = manifest_version if manifest_version else record.manifest_version
        except NotFound:
            caps, version = {}, manifest_version
        await self.store.device_connected(
            tenant, device_id, capabilities=caps, labels={}, manifest_version=version, remote=remote
        )

    async def disconnected(self, tenant: str, device_id: str) -> None:
        try:
            await self.store.device_disconnected(tenant, device_id)
        except NotFound:
            pass

    def seen(self, tenant: str, device_id: str) -> None:
        self._seen[(tenant, device_id)] = time.time()

    async def flush_seen(self) -> None:
        if not self._seen:
            return
        batch = [(t, d, ts) for (t, d), ts in self._seen.items()]
        self._seen.clear()
        try:
            await self.store.touch_devices(batch)
        except Exception:
            log.exception("could not record last-seen times")

    async def touch_loop(self) -> None:
        while True:
            await anyio.sleep(self.touch_interval)
            await self.flush_seen()


def header_map(headers: Mapping[bytes, bytes] | list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-case header names to values (repeated headers joined with ``, ``)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        out[key] = f"{out[key]}, {val}" if key in out else val
    return out


__all__ = [
    "Desired",
    "DeviceBackend",
    "ProblemError",
    "header_map",
    "parse_json_body",
    "validate_capabilities",
    "validate_status",
]
