"""MQTT as a desired-state transport: a real Mosquitto broker, a bridge to the store, a client.

Broker (``MosquittoBroker``): a generated ``mosquitto.conf`` on loopback, TLS 1.3 only, client
certificates required. Mosquitto cannot pick a CA by a certificate's SPIFFE ID and matches
ACLs on the certificate's CN only, so one listener carrying the union of tenant bundles could
not keep ``acme/edge-1`` apart from ``globex/edge-1``. Instead every tenant gets its own
listener whose ``cafile`` is that tenant's bundle alone (``per_listener_settings true``), with
``use_identity_as_username`` and an ACL that confines a device to ``margo/<tenant>/<CN>/...``.
The bridge connects on one more listener trusting only a throw-away bridge CA made per run.
Limits, stated: the CN is the device id cut at 64 characters (X.509's limit), and the SPIFFE
URI SAN is not consulted by the broker.

Topics (QoS 1):

- ``margo/<tenant>/<device>/desired`` (bridge -> device, retained): msgpack
  ``{"t": "desired", "v", "m": manifest bytes, "s": signature, "b": {digest: bytes}}``. A
  retained message cannot know what a reconnecting device holds, so ``b`` carries every blob
  the manifest references (unlike the QUIC and HTTP/2 pushes, which send only missing ones).
- ``margo/<tenant>/<device>/status`` (device -> bridge): Margo's DeploymentStatusManifest JSON.
- ``margo/<tenant>/<device>/capabilities`` (device -> bridge): DeviceCapabilitiesManifest JSON.
- ``margo/<tenant>/<device>/online`` (device, retained, ``0`` as the will): presence.

The bridge (``MqttBridge``) trusts the tenant and device in a topic because the broker's ACL
only lets that certificate publish there. The client (``MqttClient``) uses paho-mqtt's network
thread (``loop_start``); callbacks hop onto the event loop with ``call_soon_threadsafe``. Byte
counters come from the kernel (``TCP_INFO`` ``tcpi_bytes_acked``/``tcpi_bytes_received``),
since paho's socket is not ours to wrap.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import getpass
import json
import logging
import math
import shutil
import socket
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgpack

from bench.transports.base import (
    DesiredUpdate,
    StatusState,
    TransportCounters,
    capabilities_document,
    status_document,
)
from controller.device_api.backend import DeviceBackend
from controller.device_api.tls import client_context
from controller.problems import Problem
from controller.store.base import Store
from margo_stream.identity.fleet_manager import fleet_manager_paths
from margo_stream.identity.pki import (
    CONTROLLER_DIR,
    cert_to_pem,
    key_to_pem,
    make_ca,
    make_leaf,
)
from margo_stream.identity.trust import load_device_credentials

log = logging.getLogger("margo.bench.mqtt")

PACKAGE = "mosquitto"
BRIDGE_USER = "margo-bridge"
QOS = 1


def mosquitto_path() -> str | None:
    """The broker binary, or None (install the Debian package ``mosquitto``)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def topic(tenant: str, device_id: str, leaf: str) -> str:
    return f"margo/{tenant}/{device_id}/{leaf}"


def tcp_bytes(sock: object) -> tuple[int, int] | None:
    """(bytes sent and acked, bytes received) of a TCP socket from Linux ``TCP_INFO``; None for
    anything else (no socket yet, or paho's socket-like wrappers)."""
    if not isinstance(sock, socket.socket) or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < 136:
        return None
    acked, received = struct.unpack_from("<QQ", info, 120)
    return acked, received


class MosquittoBroker:
    """Runs ``mosquitto -c <generated conf>``; one TLS listener per tenant plus the bridge's."""

    def __init__(
        self, certs_dir: Path, run_dir: Path, tenants: Sequence[str], *, host: str = "127.0.0.1"
    ) -> None:
        self.certs_dir = Path(certs_dir)
        self.run_dir = Path(run_dir)
        self.tenants = list(tenants)
        self.host = host
        self.ports: dict[str, int] = {}
        self.bridge_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.bridge_cert = self.run_dir / "bridge-cert.pem"
        self.bridge_key = self.run_dir / "bridge-key.pem"
        self.log_path = self.run_dir / "mosquitto.log"

    def _bridge_identity(self) -> Path:
        now = dt.datetime.now(dt.UTC)
        ca, ca_key = make_ca(
            "margo-stream bench bridge CA",
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + dt.timedelta(days=2),
        )
        leaf, key = make_leaf(
            ca,
            ca_key,
            uris=(),
            common_name=BRIDGE_USER,
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + dt.timedelta(days=1),
        )
        ca_path = self.run_dir / "bridge-ca.pem"
        ca_path.write_bytes(cert_to_pem(ca))
        self.bridge_cert.write_bytes(cert_to_pem(leaf))
        self.bridge_key.write_bytes(key_to_pem(key))
        self.bridge_key.chmod(0o600)
        return ca_path

    def write_config(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        server_cert = self.certs_dir / CONTROLLER_DIR / "cert.pem"
        server_key = self.certs_dir / CONTROLLER_DIR / "key.pem"
        bridge_ca = self._bridge_identity()
        lines = [
            "per_listener_settings true",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"user {getpass.getuser()}",
            "max_inflight_messages 100",
            "",
        ]

        def listener(
            port: int, cafile: Path, acl: Path, cert: Path = server_cert, key: Path = server_key
        ) -> None:
            lines.extend(
                [
                    f"listener {port} {self.host}",
                    f"cafile {cafile}",
                    f"certfile {cert}",
                    f"keyfile {key}",
                    "tls_version tlsv1.3",
                    "require_certificate true",
                    "use_identity_as_username true",
                    "allow_anonymous false",
                    f"acl_file {acl}",
                    "",
                ]
            )

        for tenant in self.tenants:
            port = self.ports[tenant] = _free_port()
            acl = self.run_dir / f"acl-{tenant}"
            acl.write_text(
                f"pattern read margo/{tenant}/%u/desired\n"
                f"pattern write margo/{tenant}/%u/status\n"
                f"pattern write margo/{tenant}/%u/capabilities\n"
                f"pattern readwrite margo/{tenant}/%u/online\n"
            )
            # a tenant's devices trust only their tenant's CA: its listener presents the
            # controller's fleet-manager certificate for that tenant
            fm_cert, fm_key = fleet_manager_paths(self.certs_dir, tenant)
            if fm_cert.exists():
                listener(port, self.certs_dir / tenant / "ca.pem", acl, fm_cert, fm_key)
            else:
                listener(port, self.certs_dir / tenant / "ca.pem", acl)
        self.bridge_port = _free_port()
        bridge_acl = self.run_dir / "acl-bridge"
        bridge_acl.write_text(f"user {BRIDGE_USER}\ntopic readwrite margo/#\n")
        listener(self.bridge_port, bridge_ca, bridge_acl)
        conf = self.run_dir / "mosquitto.conf"
        conf.write_text("\n".join(lines))
        return conf

    async def start(self, timeout: float = 10.0) -> None:
        binary = mosquitto_path()
        if binary is None:
            raise RuntimeError(f"mosquitto is not installed (Debian package {PACKAGE!r})")
        conf = self.write_config()
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - handed to the process
        try:
            self.proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log_file.close()
        with anyio.fail_after(timeout):
            for port in [*self.ports.values(), self.bridge_port]:
                while True:
                    if self.proc.poll() is not None:
                        raise RuntimeError(
                            f"mosquitto exited ({self.proc.returncode}): "
                            f"{self.log_path.read_text(errors='replace')[-2000:]}"
                        )
                    try:
                        stream = await anyio.connect_tcp(self.host, port)
                    except OSError:
                        await anyio.sleep(0.02)
                        continue
                    await stream.aclose()
                    break

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await anyio.to_thread.run_sync(proc.wait, 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            await anyio.to_thread.run_sync(proc.wait)

    async def __aenter__(self) -> MosquittoBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.stop()


class _PahoAdapter:
    """paho's threaded network loop, with events delivered onto the running event loop."""

    def __init__(self, client_id: str, ssl_context: Any) -> None:
        import paho.mqtt.client as paho

        self.loop = asyncio.get_running_loop()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self.client.tls_set_context(ssl_context)
        self.send, self.recv = anyio.create_memory_object_stream[Any](math.inf)
        self.connected = asyncio.Event()
        self.acks: dict[int, asyncio.Future[Any]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.connect_error: str | None = None

    def _call(self, fn: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed
            pass

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None
    ) -> None:
        if rc.is_failure:
            self.connect_error = str(rc)
        self._call(self.connected.set)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None
    ) -> None:
        if not self.connected.is_set():
            self.connect_error = f"disconnected: {rc}"
            self._call(self.connected.set)

    def _deliver(self, item: tuple[str, bytes]) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.send.send_nowait(item)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._call(self._deliver, (msg.topic, bytes(msg.payload)))

    def _resolve(self, mid: int, value: Any) -> None:
        fut = self.acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any = None) -> None:
        self._call(self._resolve, mid, rc)

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any = None
    ) -> None:
        self._call(self._resolve, mid, rcs)

    async def connect(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.client.connect_async(host, port, keepalive=60)
        self.client.loop_start()
        with anyio.fail_after(timeout):
            await self.connected.wait()
        if self.connect_error:
            raise ConnectionError(f"MQTT connect to {host}:{port} failed: {self.connect_error}")

    def _future(self, mid: int) -> asyncio.Future[Any]:
        fut = self.loop.create_future()
        self.acks[mid] = fut
        return fut

    async def publish(
        self,
        topic_name: str,
        payload: bytes,
        *,
        retain: bool = False,
        wait: bool = True,
        timeout: float = 10.0,
    ) -> None:
        # register the future before paho can deliver the PUBACK on its thread
        info = self.client.publish(topic_name, payload, qos=QOS, retain=retain)
        if info.rc != 0:
            raise ConnectionError(f"MQTT publish to {topic_name} failed (rc {info.rc})")
        if wait and not info.is_published():
            fut = self._future(info.mid)
            if info.is_published():
                self._resolve(info.mid, None)
            with anyio.fail_after(timeout):
                await fut

    async def subscribe(self, topic_name: str, timeout: float = 10.0) -> None:
        rc, mid = self.client.subscribe(topic_name, qos=QOS)
        if rc != 0 or mid is None:  # paho has no message id only with an error code
            raise ConnectionError(f"MQTT subscribe to {topic_name} failed (rc {rc})")
        fut = self._future(mid)
        with anyio.fail_after(timeout):
            codes = await fut
        for code in codes or ():
            if code.is_failure:
                raise PermissionError(f"subscription to {topic_name} refused: {code}")

    async def close(self) -> None:
        self.client.disconnect()
        await anyio.to_thread.run_sync(self.client.loop_stop)
        self.send.close()
        self.recv.close()


class MqttBridge:
    """Subscribes to device topics and publishes each device's newest desired state."""

    def __init__(self, store: Store, broker: MosquittoBroker, tenants: Sequence[str]) -> None:
        self.backend = DeviceBackend(store)
        self.broker = broker
        self.tenants = list(tenants)
        self.published: dict[tuple[str, str], int] = {}
        self._wake = anyio.Event()
        self._dirty: set[tuple[str, str]] = set()
        self.paho: _PahoAdapter | None = None
        self.ready = anyio.Event()

    def notify(self, tenant: str, device_ids: Sequence[str]) -> None:
        self._dirty.update((tenant, d) for d in device_ids)
        self._wake.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[MqttBridge] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        ctx = client_context(
            self.broker.bridge_cert,
            self.broker.bridge_key,
            self.broker.certs_dir / CONTROLLER_DIR / "ca.pem",
        )
        self.paho = _PahoAdapter(f"{BRIDGE_USER}-{id(self):x}", ctx)
        await self.paho.connect(self.broker.host, self.broker.bridge_port)
        try:
            for leaf in ("status", "capabilities", "online"):
                await self.paho.subscribe(f"margo/+/+/{leaf}")
            for tenant in self.tenants:
                for dev in await self.backend.store.list_devices(tenant):
                    self._dirty.add((tenant, dev.device_id))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._inbound)
                tg.start_soon(self.backend.touch_loop)
                await self._publish_dirty()
                self.ready.set()
                task_status.started(self)
                while True:
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    await self._publish_dirty()
        finally:
            with anyio.CancelScope(shield=True):
                await self.paho.close()

    async def _publish_dirty(self) -> None:
        assert self.paho is not None
        while self._dirty:
            tenant, device_id = self._dirty.pop()
            try:
                desired = await self.backend.desired(tenant, device_id)
                if desired is None or desired.version <= self.published.get((tenant, device_id), 0):
                    continue
                blobs = await self.backend.blobs(tenant, desired.digests)
                payload = msgpack.packb(
                    {
                        "t": "desired",
                        "v": desired.version,
                        "m": desired.manifest_bytes,
                        "s": desired.signature,
                        "b": blobs,
                    },
                    use_bin_type=True,
                )
                await self.paho.publish(topic(tenant, device_id, "desired"), payload, retain=True)
                self.published[(tenant, device_id)] = desired.version
            except Exception:
                log.exception("cannot publish desired state of %s/%s", tenant, device_id)

    async def _inbound(self) -> None:
        assert self.paho is not None
        async for name, payload in self.paho.recv:
            parts = name.split("/")
            if len(parts) != 4 or parts[0] != "margo":
                continue
            _, tenant, device_id, leaf = parts
            try:
                if leaf == "online":
                    if payload == b"1":
                        await self.backend.connected(tenant, device_id, "mqtt", None)
                        self.notify(tenant, [device_id])
                    elif payload == b"0":
                        await self.backend.disconnected(tenant, device_id)
                    continue
                doc = json.loads(payload)
                if leaf == "status":
                    dep = doc.get("deploymentId", "") if isinstance(doc, dict) else ""
                    await self.backend.put_status(tenant, device_id, doc, str(dep), "mqtt")
                elif leaf == "capabilities":
                    await self.backend.put_capabilities(tenant, device_id, device_id, doc, "mqtt")
            except (Problem, ValueError) as exc:
                log.warning("refused %s from %s/%s: %s", leaf, tenant, device_id, exc)
            except Exception:
                log.exception("cannot store %s from %s/%s", leaf, tenant, device_id)


class MqttClient:
    name = "mqtt"

    def __init__(
        self, identity_dir: Path, host: str, port: int, *, report_capabilities: bool = True
    ) -> None:
        self.creds = load_device_credentials(identity_dir)
        self.tenant, self.device_id = self.creds.tenant, self.creds.device_id
        self.host, self.port = host, port
        self.report_capabilities = report_capabilities
        self.counters = TransportCounters()
        self._ctx = client_context(self.creds.cert_path, self.creds.key_path, self.creds.ca_path)
        self.paho: _PahoAdapter | None = None
        self._version = 0
        self.blobs: dict[str, bytes] = {}

    def _topic(self, leaf: str) -> str:
        return topic(self.tenant, self.device_id, leaf)

    def sample(self) -> TransportCounters:
        """Refresh the byte counters from the kernel and return them."""
        if self.paho is not None:
            got = tcp_bytes(self.paho.client.socket())
            if got is not None:
                self.counters.bytes_sent, self.counters.bytes_received = got
        return self.counters

    async def connect(self) -> None:
        self.paho = _PahoAdapter(f"{self.tenant}/{self.device_id}", self._ctx)
        self.paho.client.will_set(self._topic("online"), b"0", qos=QOS, retain=True)
        await self.paho.connect(self.host, self.port)
        await self.paho.subscribe(self._topic("desired"))
        if self.report_capabilities:
            await self.paho.publish(
                self._topic("capabilities"),
                json.dumps(capabilities_document(self.device_id)).encode(),
            )
            self.counters.requests += 1
        await self.paho.publish(self._topic("online"), b"1", retain=True)
        self.counters.requests += 2
        self.sample()

    async def subscribe(self, topic_name: str) -> None:
        """Raw subscription (the cross-tenant test uses it to probe the ACL)."""
        assert self.paho is not None
        await self.paho.subscribe(topic_name)

    async def next_desired(self) -> DesiredUpdate:
        assert self.paho is not None
        async for _name, payload in self.paho.recv:
            rec = msgpack.unpackb(payload, raw=False)
            if (
                not isinstance(rec, dict)
                or rec.get("t") != "desired"
                or int(rec["v"]) <= self._version
            ):
                continue
            blobs = {str(k): bytes(v) for k, v in rec.get("b", {}).items()}
            update = DesiredUpdate(int(rec["v"]), bytes(rec["m"]), bytes(rec["s"]), blobs)
            self._version = update.version
            self.blobs.update(blobs)
            self.counters.updates += 1
            self.sample()
            return update
        raise ConnectionError("MQTT client closed")

    async def post_status(
        self,
        deployment_id: str,
        manifest_version: int,
        state: StatusState,
        components: list[dict[str, Any]],
        error: dict[str, str] | None = None,
    ) -> None:
        assert self.paho is not None
        doc = status_document(
            deployment_id, self.device_id, manifest_version, state, components, error
        )
        await self.paho.publish(self._topic("status"), json.dumps(doc).encode())
        self.counters.requests += 1
        self.sample()

    async def close(self) -> None:
        if self.paho is not None:
            self.sample()
            paho, self.paho = self.paho, None
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(ConnectionError):
                    await paho.publish(self._topic("online"), b"0", retain=True, wait=False)
                await paho.close()

    async def __aenter__(self) -> MqttClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = [
    "MosquittoBroker",
    "MqttBridge",
    "MqttClient",
    "PACKAGE",
    "mosquitto_path",
    "tcp_bytes",
    "topic",
]
