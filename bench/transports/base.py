"""The one client interface the fleet simulator drives, whatever carries the bytes.

Every transport (QUIC, Margo's REST poll, HTTP/2 push, MQTT) delivers the same thing: the
device's newest signed desired state (exact manifest bytes, the detached signature, and the
blobs the device lacks) and takes the same Margo ``DeploymentStatusManifest`` back. A client
counts what it costs on the wire at the application's socket (TLS records included where the
transport can see them, see each implementation) so the bench can report idle bytes per device
per hour side by side.

``DesiredUpdate.verify(key, tenant, device_id)`` is the transport-level check the conformance
tests make: the controller's signature over the exact bytes, that the manifest names this tenant
and device, and every delivered blob's digest. A device of the bench's fleet checks everything
the agent checks before it holds an update, with the agent's own verifier (the QUIC and TCP
clients in the agent's desired-state handling, the others through ``bench.device_trust``), and
marks the update ``verified``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from margo_stream.errors import TrustError
from margo_stream.protocol.codes import Refusal
from margo_stream.state.digest import sha256_digest
from margo_stream.state.manifest import Manifest, parse_manifest, signature_valid

# A deployment's (or a component's) state in a Margo deployment status, as the wire message
# (margo_stream.protocol.messages.Status) spells it.
StatusState = Literal["pending", "installing", "installed", "failed", "removing", "removed"]


@dataclass(slots=True)
class TransportCounters:
    """Application-visible traffic of one client since ``connect()``."""

    bytes_sent: int = 0
    bytes_received: int = 0
    requests: int = 0  # request/response exchanges, publishes, or frames sent, per transport
    updates: int = 0  # desired states delivered by next_desired()
    not_modified: int = 0  # polls answered 304 (rest-poll only)
    reconnects: int = 0

    def snapshot(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(frozen=True, slots=True)
class DesiredUpdate:
    """One desired state as a transport delivered it."""

    version: int
    manifest_bytes: bytes
    signature: bytes
    blobs: dict[str, bytes] = field(default_factory=dict)
    # set once the agent's own verifier passed this update and the trust state kept it (every
    # check below and more: operators' signatures, rollback, expiry); verify() then returns it
    verified: Manifest | None = None
    held_at: float | None = None  # time.monotonic() the client held it verified, if not now

    def verify(self, key: Ed25519PublicKey, tenant: str, device_id: str) -> Manifest:
        """The parsed manifest, or ``TrustError`` naming what does not hold."""
        if self.verified is not None:
            return self.verified
        if not signature_valid(self.manifest_bytes, self.signature, key):
            raise TrustError("manifest signature does not verify", Refusal.BAD_SIGNATURE)
        manifest = parse_manifest(self.manifest_bytes)
        if (manifest.tenant, manifest.device_id) != (tenant, device_id):
            raise TrustError(
                f"manifest is for {manifest.tenant}/{manifest.device_id}",
                Refusal.WRONG_TENANT if manifest.tenant != tenant else Refusal.WRONG_DEVICE,
            )
        if manifest.manifest_version != self.version:
            raise TrustError("transport version differs from the manifest's", Refusal.MALFORMED)
        for digest, data in self.blobs.items():
            if sha256_digest(data) != digest:
                raise TrustError(
                    f"blob {digest} does not match its digest", Refusal.DIGEST_MISMATCH
                )
        return manifest

    def as_tuple(self) -> tuple[int, bytes, bytes, dict[str, bytes]]:
        return self.version, self.manifest_bytes, self.signature, dict(self.blobs)


@runtime_checkable
class TransportClient(Protocol):
    """What the fleet simulator calls; every method is a coroutine except the counters."""

    name: str  # "quic", "rest-poll", "h2-push", "mqtt"
    counters: TransportCounters

    async def connect(self) -> None:
        """Establish the session (and report capabilities where the transport has a way)."""
        ...

    async def next_desired(self) -> DesiredUpdate:
        """Wait for the next desired state newer than the last one returned."""
        ...

    async def post_status(
        self,
        deployment_id: str,
        manifest_version: int,
        state: StatusState,
        components: list[dict[str, Any]],
        error: dict[str, str] | None = None,
    ) -> None:
        """Send a Margo deployment status (delivered, or an exception)."""
        ...

    async def close(self) -> None: ...


def status_document(
    deployment_id: str,
    device_id: str,
    manifest_version: int,
    state: StatusState,
    components: list[dict[str, Any]],
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Margo rc.3 ``DeploymentStatusManifest``."""
    status: dict[str, Any] = {"state": state}
    if error:
        status["error"] = error
    return {
        "deploymentId": deployment_id,
        "deviceId": device_id,
        "adoptedManifestVersion": manifest_version,
        "status": status,
        "components": components,
    }


def capabilities_document(device_id: str, **extra: Any) -> dict[str, Any]:
    """A minimal Margo rc.3 ``DeviceCapabilitiesManifest`` for a simulated device."""
    props = {
        "id": device_id,
        "vendor": "margo-stream",
        "modelNumber": "sim-1",
        "serialNumber": device_id,
        "cpus": [{"cores": 2, "architecture": "amd64"}],
        "memory": "2 Gi",
        "storage": "16 Gi",
        "otelCollector": False,
        "supportedRuntimes": ["custom"],
        "supportedDeploymentTypes": ["custom"],
    }
    props.update(extra)
    return {"properties": props}


__all__ = [
    "DesiredUpdate",
    "StatusState",
    "TransportClient",
    "TransportCounters",
    "capabilities_document",
    "status_document",
]


class CountingStream(ByteStream):
    """Wraps an anyio byte stream (below TLS) and counts the bytes that cross it."""

    def __init__(self, inner: ByteStream, counters: TransportCounters) -> None:
        self.inner = inner
        self.counters = counters

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self.inner.receive(max_bytes)
        self.counters.bytes_received += len(data)
        return data

    async def send(self, item: bytes) -> None:
        self.counters.bytes_sent += len(item)
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.inner.extra_attributes


async def open_tls(
    host: str,
    port: int,
    ssl_context: Any,
    counters: TransportCounters,
    server_hostname: str | None = None,
) -> TLSStream:
    """TCP connect, count the raw bytes, then TLS on top; returns the TLS stream."""
    import anyio

    tcp = await anyio.connect_tcp(host, port)
    counted = CountingStream(tcp, counters)
    try:
        return await TLSStream.wrap(
            counted,
            hostname=server_hostname or host,
            ssl_context=ssl_context,
            standard_compatible=False,
        )
    except BaseException:
        await tcp.aclose()
        raise
