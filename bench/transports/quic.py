"""margo-stream's own transport behind the bench's ``TransportClient`` interface.

A :class:`QuicClient` is one simulated device speaking the real protocol with the real code:
the agent's QUIC stack (``quic_stack``: aioquic by default, ``--set quic_stack=qh3`` for the
agent's ``--quic-stack qh3``) with the device's certificate (mutual TLS), our ``Connection``
over it, and ``AgentSession`` (hello with the held manifest version and
blobs, HelloAck, keepalive pings, dead-link detection). Desired state arrives on
controller-opened desired-state streams and is handled the way the agent's desired feature
handles it: every ``Blob`` until the controller ends the stream cleanly, then the whole push is
checked by ``margo_stream.state.trust.DesiredStateVerifier`` (pinned tenant key, signature,
tenant and device, no rollback, expiry, every digest), and answered with ``DesiredResult``.
Status goes on an agent-opened status stream as ``m.Status`` with increasing sequence
numbers; ``post_status`` returns once the controller acked that sequence (it stored it).

What is simulated, stated plainly: a device "installs" a verified push by keeping its blobs in
memory and advancing its persisted trust state (``<state>/trust.json``), and nothing else:
there is no reconciler, no runtime, no blob store on disk. The agent object ``AgentSession``
talks to is this client (duck-typed like ``bench.simfleet.SimAgent``).

Byte counters are taken at the UDP socket: every datagram sent and received, QUIC headers,
TLS handshake and AEAD tags included (UDP/IP headers are not, as for the TCP transports,
whose counters see TLS records but not TCP/IP headers).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from collections import ChainMap
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from agent.desired import DesiredFeature
from agent.session import AgentSession
from bench.simfleet import SimAgent, SimConfig
from bench.transports.base import DesiredUpdate, StatusState, TransportCounters
from margo_stream.durable_io import run_durable
from margo_stream.errors import TrustError
from margo_stream.identity.trust import load_device_credentials, load_signing_pub
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode, Sender, StreamKind
from margo_stream.state.trust import DesiredStateVerifier
from margo_stream.transport.connection import Connection, MessageStream
from margo_stream.transport.qh3_connection import (
    Qh3Configuration,
    Qh3Connection,
    Qh3QuicConnection,
)
from margo_stream.transport.quic_stack import DEFAULT_QUIC_STACK, QuicStack, agent_configuration


class QuicError(Exception):
    pass


class _CountingProtocol(asyncio.DatagramProtocol):
    """The client's UDP socket: counts every datagram both ways, feeds the connection."""

    def __init__(self, counters: TransportCounters) -> None:
        self.counters = counters
        self.connection: Connection | Qh3Connection | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def sendto(self, data: bytes, addr: Any) -> None:
        self.counters.bytes_sent += len(data)
        assert self.transport is not None
        self.transport.sendto(data, addr)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.counters.bytes_received += len(data)
        if self.connection is not None:
            self.connection.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class QuicClient:
    name = "quic"

    def __init__(
        self,
        identity_dir: Path,
        host: str,
        port: int,
        *,
        state_dir: Path,
        server_name: str | None = None,  # default: the tenant, as the agent sends
        idle_timeout: float = 60.0,
        connect_timeout: float = 20.0,
        keepalive: float | None = None,
        configuration: QuicConfiguration | Qh3Configuration | None = None,
        quic_stack: QuicStack = DEFAULT_QUIC_STACK,
    ) -> None:
        self.creds = load_device_credentials(identity_dir)
        self.tenant, self.device_id = self.creds.tenant, self.creds.device_id
        self.host, self.port = host, port
        self.counters = TransportCounters()
        if configuration is None:
            configuration = agent_configuration(  # as the agent's --quic-stack
                quic_stack,
                str(self.creds.cert_path),
                str(self.creds.key_path),
                str(self.creds.ca_path),
                server_name=server_name or self.tenant,
                idle_timeout=idle_timeout,
            )
        self.configuration = configuration
        self.config = SimConfig(connect_timeout=connect_timeout, keepalive=keepalive)
        self._sim = SimAgent(self.config, self.device_id)
        self.verifier = DesiredStateVerifier(
            self.tenant,
            self.device_id,
            load_signing_pub(self.creds.root_pub_path),
            Path(state_dir) / "trust.json",
        )
        self.blobs: dict[str, bytes] = {}
        self.stream_handlers = {StreamKind.DESIRED: self._desired_stream}
        # as the agent: the root metadata of the hello's answer first, then the status stream
        self.session_tasks = [self._adopt_root, self._status_stream]
        self.hello_fields: list[Any] = []
        self.conn: Connection | Qh3Connection | None = None
        self.session: AgentSession | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._ready = anyio.Event()
        self._updates_in, self._updates = anyio.create_memory_object_stream[DesiredUpdate](16)
        self._status: MessageStream | None = None
        # DesiredFeature.handle_stream applies one push at a time (the agent's own lock)
        self._lock = anyio.Lock(fast_acquire=True)
        self._status_ready = anyio.Event()
        self._acks: dict[int, anyio.Event] = {}
        self._seq = 0
        self.last_error: BaseException | None = None

    # --- the agent object AgentSession talks to ---------------------------------------------------
    def make_hello(self) -> m.Hello:
        return self._sim.make_hello().model_copy(
            update={
                "manifest_version": self.verifier.held_version,
                "manifest_digest": self.verifier.held_digest,
                "root_version": self.verifier.root_version,
                "blobs": sorted(self.blobs)[:4096],
            }
        )

    # --- connection -------------------------------------------------------------------------------
    async def __aenter__(self) -> QuicClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Handshake, hello answered and the status stream open; the session keeps running in a
        task group entered here (``close()`` from the same task leaves it)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        udp, protocol = await loop.create_datagram_endpoint(
            lambda: _CountingProtocol(self.counters),
            # any local address: the kernel picks the source for the route (through a bench
            # link of its own, 10.199.N.1 is not a local address to bind to)
            local_addr=("::" if family == socket.AF_INET6 else "0.0.0.0", 0),
            family=family,
        )
        self._udp = udp
        conn: Connection | Qh3Connection
        if isinstance(self.configuration, Qh3Configuration):
            conn = Qh3Connection(
                Qh3QuicConnection(configuration=self.configuration),
                Sender.AGENT,
                protocol.sendto,
                loop,
            )
        else:
            quic = QuicConnection(configuration=self.configuration)
            conn = Connection(quic, Sender.AGENT, protocol.sendto, loop)
        self.conn = conn
        protocol.connection = conn
        conn.quic.connect((self.host, self.port), now=loop.time())
        conn.transmit()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            with anyio.fail_after(self.config.connect_timeout):
                await conn.wait_handshake()
                self.session = AgentSession(self, conn)  # type: ignore[arg-type]
                self._tg.start_soon(self._run_session)
                await self._ready.wait()
                if self.last_error is not None:
                    raise QuicError(f"session ended: {self.last_error}")
                await self._status_ready.wait()
        except BaseException:
            await self.close()
            raise
        self.counters.requests += 1  # the hello

    async def _run_session(self) -> None:
        assert self.session is not None
        try:
            lost = await self.session.run(on_ready=lambda _s: self._ready.set())
            self.last_error = lost
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits
            self.last_error = exc
        finally:
            self._ready.set()
            self._status_ready.set()
            for event in self._acks.values():
                event.set()
            self._updates_in.close()

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close(ErrorCode.NO_ERROR, "bench device closing")
            self.conn.cancel_timer()
        if self._tg is not None:  # entered by connect() in this task: no scope may sit in between
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        self._updates_in.close()

    @property
    def alive(self) -> bool:
        return self.conn is not None and self.conn.closed is None

    # --- desired state ----------------------------------------------------------------------------
    async def _desired_stream(self, session: AgentSession, stream: MessageStream) -> None:
        """The agent's own stream handling (``DesiredFeature.handle_stream``: every blob until a
        clean end, size limit, one push at a time), with :meth:`apply` below as its apply."""
        await DesiredFeature.handle_stream(self, session, stream)  # type: ignore[arg-type]

    async def apply(self, push: m.Desired, received: dict[str, bytes]) -> m.DesiredResult:
        """Verify the whole push; "install" = keep the blobs and advance the trust state."""
        try:
            verdict = self.verifier.verify(
                push.manifest,
                push.signature,
                ChainMap(received, self.blobs),
                now=dt.datetime.now(dt.UTC),
                root=push.root,
            )
        except TrustError as exc:
            return m.DesiredResult(
                version=push.version, ok=False, code=exc.refusal, reason=str(exc)[:1000]
            )
        if verdict.unchanged:
            return m.DesiredResult(version=push.version, ok=True, unchanged=True)
        self.blobs.update(received)
        self.counters.updates += 1
        # delivered and verified: the bench's clock stops here for every transport (the others
        # persist nothing); then the trust state advances (fsync) before anybody hears of it,
        # the controller (the result) and the device's status reporter (the update), which
        # then leave in the same packet
        held_at = time.monotonic()
        await run_durable(self.verifier.accept, verdict)  # as the agent's DesiredFeature
        self._updates_in.send_nowait(
            DesiredUpdate(
                verdict.version,
                push.manifest,
                push.signature,
                received,
                verified=verdict.manifest,
                held_at=held_at,
            )
        )
        return m.DesiredResult(version=push.version, ok=True)

    async def next_desired(self) -> DesiredUpdate:
        try:
            return await self._updates.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise QuicError(f"connection lost: {self.last_error}") from None

    # --- status -----------------------------------------------------------------------------------
    async def _adopt_root(self, session: AgentSession) -> None:
        """The agent's own root adoption (``DesiredFeature.adopt_root``)."""
        await DesiredFeature.adopt_root(self, session)  # type: ignore[arg-type]

    async def _status_stream(self, session: AgentSession) -> None:
        stream = self._status = session.conn.open_stream()
        self._status_ready.set()
        while (message := await stream.receive()) is not None:
            if isinstance(message, m.StatusAck):
                for seq in [s for s in self._acks if s <= message.seq]:
                    self._acks.pop(seq).set()

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return self._seq

    async def post_status(
        self,
        deployment_id: str,
        manifest_version: int,
        state: StatusState,
        components: list[dict[str, Any]],
        error: dict[str, str] | None = None,
    ) -> None:
        if self._status is None or not self.alive:
            raise QuicError("not connected")
        seq = self._next_seq()
        acked = self._acks[seq] = anyio.Event()
        self._status.send(
            m.Status(
                seq=seq,
                deployment_id=deployment_id,
                manifest_version=manifest_version,
                state=state,
                components=[m.ComponentStatusModel(**c) for c in components],
                error=m.StatusErrorModel(**error) if error else None,
            )
        )
        self.counters.requests += 1
        await acked.wait()
        if self._acks.pop(seq, None) is not None:  # woken by the connection's end, not an ack
            raise QuicError(f"status {seq} not acknowledged: {self.last_error}")


__all__ = ["QuicClient", "QuicError"]
