"""One device's connection on the controller, after its certificate was verified.

The session is event-driven: QUIC events arrive as callbacks on the event loop, small control
messages are answered inline, and anything that touches the store runs as a task in the
controller's task group. Tenant and device id come from the verified certificate only; a hello
naming another device closes the connection.

Before the hello is answered the session takes its device's lease (``ctx.cluster``): with
several controllers on one store, the device's session on another instance is closed with
``REPLACED``, and a session that lost its lease marks nothing in the store when it ends.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from controller.ports import Cluster, Lease, SessionHooks, TaskSpawner
from controller.registry import SessionRegistry, SessionView
from controller.root_chains import RootChains
from controller.store.base import Store
from margo_stream.errors import IdentityError, StoreError
from margo_stream.identity.spiffe import DeviceIdentity
from margo_stream.protocol import messages as m
from margo_stream.protocol.channel import StreamFailed
from margo_stream.protocol.codes import ErrorCode, StreamKind
from margo_stream.protocol.control_server import (
    ControllerControl,
    HelloReceived,
    IdentityMismatch,
    PeerError,
    SendPong,
    StatsReported,
)
from margo_stream.transport.channel_connection import (
    ChannelConnection,
    ConnectionLost,
    MessageStream,
)

log = logging.getLogger("margo.controller.session")

# the per-connection bounds a device can hit (margo_stream.protocol.channel); closing for one
# is logged as a warning naming the device
_LIMITS = (ErrorCode.STREAM_LIMIT, ErrorCode.BUFFER_LIMIT)
_LOGGED_RESETS = 10  # stream resets logged per connection; the rest only count


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What every device session shares, built once at start-up."""

    store: Store
    registry: SessionRegistry
    hooks: SessionHooks
    tasks: TaskSpawner
    hello_timeout: float
    keepalive: float
    roots: RootChains  # the tenants' root metadata, relayed in the hello's answer
    cluster: Cluster  # device leases across the controllers sharing the store


class ControllerSession:
    """Implements ``ConnectionHandler`` for the transport and ``DeviceLink`` for the features."""

    def __init__(
        self, ctx: SessionContext, conn: ChannelConnection, identity: DeviceIdentity
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.identity = identity
        self.tenant = identity.tenant
        self.device_id = identity.device_id
        self.control: MessageStream | None = None
        self.view: SessionView | None = None
        self.lease: Lease | None = None
        self.ready = False  # hello answered: other streams may flow
        self._resets = 0
        self.protocol = ControllerControl(
            self.device_id, now=conn.loop.time(), hello_timeout=ctx.hello_timeout
        )
        conn.handler = self
        deadline = self.protocol.deadline
        assert deadline is not None
        self._hello_timer = conn.loop.call_at(deadline, self._hello_timeout)

    @property
    def hello(self) -> m.Hello | None:
        return self.protocol.hello

    @property
    def remote(self) -> str:
        addr = self.conn.remote
        return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)

    def _log(self, level: int, msg: str, *args: Any, **fields: Any) -> None:
        log.log(
            level, msg, *args, extra={"tenant": self.tenant, "device": self.device_id, **fields}
        )

    # --- ConnectionHandler -------------------------------------------------------------------------
    def stream_opened(self, stream: MessageStream, first: Any) -> None:
        kind = stream.kind
        if kind is StreamKind.CONTROL:
            if self.control is not None:
                stream.reset(ErrorCode.UNEXPECTED_MESSAGE)
                return
            self.control = stream
            stream.on_message = self._on_control
            return
        if not self.ready:
            stream.reset(ErrorCode.UNEXPECTED_MESSAGE)
            self._log(logging.INFO, "reset a %s stream opened before the hello was answered", kind)
            return
        handler = self.ctx.hooks.stream_handlers.get(kind) if kind else None
        if handler is None:
            stream.reset(ErrorCode.WRONG_STREAM_OPENER)
            return
        handler(self, stream)

    def stream_failed(self, stream: MessageStream | None, event: StreamFailed) -> None:
        if event.kind is StreamKind.CONTROL or (stream is not None and stream is self.control):
            self._log(logging.WARNING, "control stream failed: %s", event.reason, code=event.code)
            self.close(event.code, f"control stream failed: {event.reason}")
        elif not event.reset_by_peer:
            self._resets += 1
            level = logging.INFO if self._resets <= _LOGGED_RESETS else logging.DEBUG
            self._log(level, "reset a %s stream: %s", event.kind, event.reason, code=event.code)

    def connection_lost(self, exc: ConnectionLost) -> None:
        self._hello_timer.cancel()
        if not exc.by_peer and exc.code in _LIMITS:
            self._log(
                logging.WARNING,
                "closed the connection from %s: %s",
                self.remote,
                exc.reason,
                event="connection-bounds",
                code=exc.code,
                streams_reset=self._resets,
            )
        for hook in self.ctx.hooks.closed:
            hook(self)
        if self.view is not None and self.ctx.registry.unregister(self.view):
            self.ctx.tasks.spawn(self._gone, time.time())
            self._log(
                logging.INFO,
                "device disconnected: %s",
                exc.reason or ErrorCode.describe(exc.code),
                event="device-disconnected",
                code=exc.code,
            )

    async def _gone(self, now: float) -> None:
        """Release the lease; the device is recorded disconnected only if it was still ours
        (fenced: another instance that took the device keeps it connected)."""
        assert self.lease is not None
        if await self.ctx.cluster.release(self.lease):
            await self.ctx.store.device_disconnected(self.tenant, self.device_id, now)

    # --- registry handle ---------------------------------------------------------------------------
    def close(self, code: int, reason: str) -> None:
        self.conn.close(code, reason)

    # --- control stream --------------------------------------------------------------------------
    def _on_control(self, message: Any) -> None:
        event = self.protocol.received(message)
        if isinstance(event, HelloReceived):
            self._hello_timer.cancel()
            # an agent that takes compressed frames gets them (a push's manifest and document
            # then fit one datagram), referring back to their stream's frames if it keeps that
            self.conn.core.compress = event.hello.proto >= m.PROTO_COMPRESSED_FRAMES
            self.conn.core.share_window = event.hello.proto >= m.PROTO_SHARED_WINDOW
            self.ctx.tasks.spawn(self._welcome, event.hello)
        elif isinstance(event, IdentityMismatch):
            self._hello_timer.cancel()
            self._log(logging.WARNING, "refused: %s", event.reason, event="identity-mismatch")
            self.close(ErrorCode.IDENTITY_MISMATCH, event.reason)
        elif isinstance(event, SendPong):
            self.send_control(event.pong)
        elif isinstance(event, StatsReported):
            if self.view is not None:
                self.view.extra["stats"] = event.values
            self.ctx.tasks.spawn(
                self.ctx.store.set_device_stats, self.tenant, self.device_id, event.values
            )
        elif isinstance(event, PeerError):
            self._log(logging.WARNING, "agent reported an error: %s", event.reason, code=event.code)

    async def _welcome(self, hello: m.Hello) -> None:
        ctx = self.ctx
        try:
            lease = await ctx.cluster.acquire(self.tenant, self.device_id, self.conn.carrier)
        except StoreError as exc:
            self._log(logging.WARNING, "refused: %s", exc, event="lease-failed")
            self.close(ErrorCode.INTERNAL_ERROR, "the controller cannot take the session now")
            return
        now = time.time()
        watermark = await ctx.store.telemetry_watermark(self.tenant, self.device_id)
        view = SessionView(
            tenant=self.tenant,
            device_id=self.device_id,
            remote=self.remote,
            connected_since=now,
            last_seen=now,
            manifest_version=hello.manifest_version,
            handle=self,
            generation=lease.generation,
            transport=self.conn.carrier,
        )
        if self.conn.closed is not None:
            await ctx.cluster.release(lease)
            return
        if ctx.registry.newer(view) is not None:  # a later connection got here first
            self.close(ErrorCode.REPLACED, "replaced by a newer connection from the same device")
            return
        self.lease = lease
        ctx.cluster.replaced(lease)  # the instance that held it closes its session
        old = ctx.registry.register(view)
        self.view = view
        if old is not None and old.handle is not None and old.handle is not self:
            old.handle.close(
                ErrorCode.REPLACED, "replaced by a newer connection from the same device"
            )
            self._log(logging.INFO, "replaced the previous connection", event="session-replaced")
        elif lease.previous is not None:
            self._log(
                logging.INFO,
                "took the device from instance %s",
                lease.previous,
                event="session-replaced",
                previous=lease.previous,
            )
        self.send_control(
            m.HelloAck(
                tenant=self.tenant,
                device_id=self.device_id,
                server_time=now,
                keepalive_s=ctx.keepalive,
                telemetry_acked=watermark,
                root=self._root_update(hello),
            )
        )
        self.ready = True
        # Persisted right after the answer, not before: a connect storm would otherwise queue
        # every hello behind every other device's write. The store runs calls in submission
        # order, so anything the device's streams make the controller store next (status,
        # telemetry) is queued behind this record.
        await ctx.store.device_connected(
            self.tenant,
            self.device_id,
            capabilities=hello.capabilities.model_dump(exclude_none=True),
            reported_labels=dict(hello.capabilities.labels),
            manifest_version=hello.manifest_version,
            remote=self.remote,
            now=now,
        )
        self._log(
            logging.INFO,
            "device connected from %s",
            self.remote,
            event="device-connected",
            manifest_version=hello.manifest_version,
        )
        for hook in ctx.hooks.ready:
            await hook(self)

    def _root_update(self, hello: m.Hello) -> list[bytes]:
        """The tenant's root metadata versions the device does not hold yet."""
        try:
            return self.ctx.roots.newer_than(self.tenant, hello.root_version)
        except IdentityError as exc:
            self._log(logging.ERROR, "cannot relay the tenant's root metadata: %s", exc)
            return []

    def send_control(self, message: BaseModel) -> None:
        if self.control is not None and self.conn.closed is None:
            self.control.send(message)

    def _hello_timeout(self) -> None:
        event = self.protocol.timer(self.conn.loop.time())
        if event is not None:
            self._log(logging.WARNING, "%s", event.reason, event="hello-timeout")
            self.close(ErrorCode.HELLO_TIMEOUT, event.reason)
