"""The agent daemon: its state directory and the connect loop that keeps one mutual-TLS QUIC
connection to a controller up through network failures.

The loop carries out what ``agent.controller_list.ControllerOrder`` says (resolve the names,
dial a controller, back off) and tells it how each attempt ended; with several controllers the
agent moves to the next one at once when its connection is lost.

The agent is given its ``agent.ports.AgentSetup`` (identity, and what the features plugged in;
``agent/features.py`` builds it). Features that must keep working offline (the reconciler, the
telemetry buffer and its producer socket) live for the whole process in ``background_tasks``;
features that need the link run per connection in ``session_tasks`` and ``stream_handlers``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import ssl
import time
from typing import Any

import anyio
from aioquic.quic.configuration import QuicConfiguration

from agent.backoff import Backoff
from agent.capabilities import collect
from agent.carrier_policy import (
    MAX_MEMORY_BYTES,
    Carrier,
    CarrierPolicy,
    DialQuic,
    Remembered,
)
from agent.carriers import Link, controller_identity, dial_quic, dial_tcp, tcp_context, tcp_route
from agent.config import AgentConfig
from agent.controller_list import ControllerOrder, Resolve, Target, Wait, order_rng
from agent.controller_resolve import resolve_entries
from agent.ports import AgentSetup, SessionTask, StreamHandler
from agent.renewal import renewal_loop
from agent.session import AgentSession, HelloRefused
from agent.users import terminal_user, workload_user
from margo_stream import __version__
from margo_stream.errors import ConfigError, PeerRejected
from margo_stream.fsutil import atomic_write
from margo_stream.identity.trust import DeviceCredentials
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import ErrorCode, StreamKind
from margo_stream.transport.channel_connection import ChannelConnection, ConnectionLost
from margo_stream.transport.proxy import ProxyError
from margo_stream.transport.qh3_connection import Qh3Configuration
from margo_stream.transport.quic_stack import agent_configuration

log = logging.getLogger("margo.agent")

# TLS alerts (QUIC CRYPTO_ERROR 0x100 + alert) that mean "the controller's certificate failed
# verification" when our handshake ends with them: bad, unsupported, revoked, expired,
# unknown certificate, unknown CA
CERTIFICATE_ALERTS = frozenset(0x100 + alert for alert in (42, 43, 44, 45, 46, 48))
CARRIER_FILE = "carrier.json"  # the carrier that worked last (agent.carrier_policy.Remembered)


class Agent:
    def __init__(self, setup: AgentSetup) -> None:
        self.setup = setup
        self.config: AgentConfig = setup.config
        self.creds: DeviceCredentials = setup.creds
        self.device_id = setup.device_id
        self.tenant = setup.tenant
        self.session: AgentSession | None = None
        self.counters = {"connects": 0, "disconnects": 0, "refusals": 0}
        self.last_error: str | None = None
        self.controller_id: str | None = None  # SPIFFE ID of the controller last accepted
        cfg = self.config
        self.order = ControllerOrder(
            cfg.controllers,
            order_rng(self.device_id, cfg.controller_order_seed),
            Backoff(base=cfg.backoff_base, cap=cfg.backoff_cap),
        )
        self.target: Target | None = None  # the controller dialled last
        self.carriers = self._new_policy(None)  # replaced by what the state dir remembers
        self._remembered: Remembered | None = None
        self.transport: Carrier | None = None  # carrier of the current (else last) session
        self._promoted: Link | None = None  # a QUIC probe's link, for the next session
        self._up_since: float | None = None  # when the current attempt's session became ready
        self._renewing = False
        self._stop = anyio.Event()
        self._lock_fd: int | None = None

    # --- what a session needs (agent.session.SessionOwner) -----------------------------------------
    @property
    def stream_handlers(self) -> dict[StreamKind, StreamHandler]:
        return self.setup.stream_handlers

    @property
    def session_tasks(self) -> list[SessionTask]:
        return self.setup.session_tasks

    # --- hello ------------------------------------------------------------------------------------
    def make_hello(self) -> m.Hello:
        fields: dict[str, Any] = {}
        for contribute in self.setup.hello_fields:
            fields.update(contribute())
        caps = collect(self.device_id, self.config.state, dict(self.config.labels))
        return m.Hello(
            device_id=self.device_id, agent_version=__version__, capabilities=caps, **fields
        )

    # --- lifecycle --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._stop.set()

    def _lock_state_dir(self) -> None:
        state = self.config.state
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(state / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"state directory {state} is in use by another margo-agent") from None
        self._lock_fd = fd

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[Agent] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._lock_state_dir()
        self._recall_carrier()
        log.info(
            "agent %s/%s started; process workloads run as %s, terminals as %s "
            "(compose and helm as the agent)",
            self.tenant,
            self.device_id,
            workload_user(self.config).describe(),
            terminal_user(self.config).describe(),
            extra={"event": "agent-started"},
        )
        try:
            async with anyio.create_task_group() as tg:
                for task in self.setup.background_tasks:
                    tg.start_soon(task)
                tg.start_soon(
                    renewal_loop, self.config.identity, self.tenant, self.device_id, self._renewed
                )
                tg.start_soon(self._connect_loop)
                task_status.started(self)
                await self._stop.wait()
                if self.session is not None:
                    self.session.conn.close(ErrorCode.NO_ERROR, "agent shutting down")
                    await anyio.sleep(0.02)  # let the CONNECTION_CLOSE leave
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for hook in self.setup.shutdown_hooks:
                    try:
                        await hook()
                    except Exception:
                        log.exception("shutdown hook failed")
            self._write_status(connected=False)
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            log.info("agent stopped", extra={"event": "agent-stopped"})

    def _renewed(self) -> None:
        """A renewed certificate and key are on disk: reconnect with them now."""
        if self.session is not None:
            self._renewing = True  # the same controller again, at once
            self.session.conn.close(ErrorCode.NO_ERROR, "certificate renewed")

    async def _connect_loop(self) -> None:
        cfg = self.config
        order = self.order
        hop_reason: str | None = None  # why the last attempt ended, when no wait followed yet
        while True:
            action = order.next_action()
            if isinstance(action, Resolve):
                found = await resolve_entries(action.entries, cfg.connect_timeout)
                order.resolved(found.addresses)
                if found.errors:
                    self.last_error = "; ".join(
                        f"cannot resolve {entry}: {why}" for entry, why in found.errors.items()
                    )
                continue
            if isinstance(action, Wait):
                hop_reason = None
                log.info(
                    "reconnecting in %.2f s (%s)",
                    action.delay,
                    self.last_error,
                    extra={
                        "event": "reconnect-wait",
                        "delay": round(action.delay, 3),
                        "reason": self.last_error,
                    },
                )
                await anyio.sleep(action.delay)
                continue
            target = self.target = action.target
            if hop_reason is not None:
                log.info(
                    "trying controller %s (%s)",
                    target,
                    hop_reason,
                    extra={"event": "controller-next", "controller": str(target.entry)},
                )
            self._up_since = None
            hop_reason = self.last_error = await self._one_connection(target)
            self.carriers.disconnected()
            self._remember_carrier()
            self._write_status(connected=False)
            if self._up_since is None:
                order.failed(target)
            else:
                uptime = time.monotonic() - self._up_since
                order.lost(target, uptime, retry_same=self._renewing)
            self._renewing = False

    # --- one attempt: a carrier, a session, and maybe the move back to QUIC ------------------------
    def _quic_configuration(self) -> QuicConfiguration | Qh3Configuration:
        creds = self.creds
        return agent_configuration(  # read per connection: renewal replaces the files
            self.config.quic_stack,
            str(creds.cert_path),
            str(creds.key_path),
            str(creds.ca_path),
            server_name=self._server_name,
            idle_timeout=self.config.idle_timeout,
            congestion_control=self.config.congestion_control,
        )

    @property
    def _server_name(self) -> str:
        return self.config.server_name or self.tenant  # the controller presents our tenant's

    async def _dial(self, target: Target) -> Link | str:
        """A handshaken connection to ``target`` over the carrier the policy picks (QUIC, or
        TCP after QUIC got no handshake), or why there is none."""
        cfg = self.config
        dial = self.carriers.first(time.time())
        if isinstance(dial, DialQuic):
            try:
                return await dial_quic(target, self._quic_configuration(), dial.timeout)
            except TimeoutError:
                why = f"no answer from {target} over QUIC within {dial.timeout:g} s"
            except OSError as exc:
                why = f"cannot reach {target} over QUIC: {exc.strerror or exc}"
            except ConnectionLost as exc:
                if exc.code in CERTIFICATE_ALERTS:
                    return self._controller_refused(target, f"TLS: {exc.reason}")
                return f"connection closed: {ErrorCode.describe(exc.code)}: {exc.reason}"
            dial = self.carriers.quic_failed(time.time(), why)
            quic_failure = f"{why}; "
        else:
            quic_failure = ""
        try:
            route = tcp_route(cfg, target)
        except ConfigError as exc:  # HTTPS_PROXY names no usable proxy
            return f"{quic_failure}TCP: {exc}"
        log.info(
            "connecting to %s over TCP: %s",
            route,
            dial.reason,
            extra={"event": "carrier-tcp", "controller": str(target.entry), "reason": dial.reason},
        )
        creds = self.creds
        try:
            return await dial_tcp(
                route,
                tcp_context(str(creds.cert_path), str(creds.key_path), str(creds.ca_path)),
                server_name=self._server_name,
                timeout=cfg.connect_timeout,
                idle_timeout=cfg.idle_timeout,
            )
        except TimeoutError:
            return f"{quic_failure}no answer from {route} over TCP within {cfg.connect_timeout:g} s"
        except ProxyError as exc:
            return f"{quic_failure}TCP: {exc}"
        except ssl.SSLCertVerificationError as exc:
            return self._controller_refused(target, f"TLS: {exc.verify_message or exc}")
        except (OSError, ssl.SSLError) as exc:
            return f"{quic_failure}cannot reach {route} over TCP: {exc.strerror or exc}"
        except ConnectionLost as exc:
            if exc.code in CERTIFICATE_ALERTS:
                return self._controller_refused(target, f"TLS: {exc.reason}")
            return f"{quic_failure}TCP: {ErrorCode.describe(exc.code)}: {exc.reason}"

    async def _one_connection(self, target: Target) -> str:
        dialled = await self._dial(target)
        link: Link | None = dialled if isinstance(dialled, Link) else None
        if link is None:
            return str(dialled)
        reason = ""
        while link is not None:  # a successful probe hands over the next link (the move back)
            reason, link = await self._serve(link, target)
        return reason

    async def _serve(self, link: Link, target: Target) -> tuple[str, Link | None]:
        """Run a session over ``link``; why it ended, and the QUIC link to move to when a probe
        found QUIC working while this one was on TCP."""
        self._promoted = None
        conn = link.conn
        try:
            try:
                self.controller_id = controller_identity(conn, self.tenant)
            except PeerRejected as exc:
                conn.close(ErrorCode.IDENTITY_REFUSED, exc.reason)
                return self._controller_refused(target, exc.reason), None
            session = AgentSession(self, conn)

            def ready(s: AgentSession) -> None:
                self.session = s
                first = self._up_since is None
                if first:
                    self._up_since = time.monotonic()
                    self.order.ready(target)  # the backoff starts over
                self.carriers.connected(link.carrier, time.time())
                self.transport = link.carrier
                self._remember_carrier()
                self.counters["connects"] += 1
                log.info(
                    "connected to %s (%s) as %s/%s over %s%s",
                    target,
                    self.controller_id,
                    self.tenant,
                    self.device_id,
                    link.carrier.value,
                    f" ({self.config.quic_stack})" if link.carrier is Carrier.QUIC else "",
                    extra={
                        "quic_stack": self.config.quic_stack,
                        "event": "connected",
                        "controller": str(target.entry),
                        "address": target.endpoint,
                        "controller_id": self.controller_id,
                        "transport": link.carrier.value,
                        "via": link.where,
                    },
                )
                self._write_status(connected=True)  # after the log: who reads it finds both
                if link.carrier is Carrier.TCP:
                    probing.start_soon(self._probe_quic, target, conn)

            try:
                async with anyio.create_task_group() as probing:
                    try:
                        lost = await session.run(on_ready=ready)
                    finally:
                        probing.cancel_scope.cancel()
            except BaseExceptionGroup as group:  # anyio wraps what ended the session (and the
                raise _first_leaf(group) from None  # probing group wraps that once more)
            self.counters["disconnects"] += 1
            promoted, self._promoted = self._promoted, None
            why = f"connection lost: {ErrorCode.describe(lost.code)}: {lost.reason}"
            return why, promoted
        except TimeoutError:
            return f"no answer from {target} within {self.config.connect_timeout:.0f} s", None
        except ConnectionLost as exc:
            if exc.code == ErrorCode.IDENTITY_REFUSED:
                self.counters["refusals"] += 1
                log.error(
                    "controller refused this device's certificate: %s",
                    exc.reason,
                    extra={"event": "identity-refused"},
                )
            return f"connection closed: {ErrorCode.describe(exc.code)}: {exc.reason}", None
        except HelloRefused as exc:
            return str(exc), None
        finally:
            self.session = None
            link.release()
            if self._promoted is not None:  # the probe won, but the session ended otherwise
                self._promoted.release()
                self._promoted = None

    async def _probe_quic(self, target: Target, tcp: ChannelConnection) -> None:
        """While on TCP: a real QUIC handshake to the same controller every --quic-retry; when
        one completes (and the controller's certificate checks out), end the TCP session and
        hand the QUIC connection over to the next session (the move back)."""
        policy = self.carriers
        while (due := policy.probe_at()) is not None:
            await anyio.sleep(max(0.0, due - time.time()))
            try:
                link = await dial_quic(target, self._quic_configuration(), policy.quic_timeout)
            except (TimeoutError, OSError, ConnectionLost) as exc:
                policy.probe_failed(time.time())
                self._remember_carrier()
                log.info(
                    "QUIC to %s still fails (%s); staying on TCP, next try in %.0f s",
                    target,
                    str(exc) or "no handshake",
                    policy.quic_retry,
                    extra={"event": "carrier-probe", "ok": False},
                )
                continue
            try:
                controller_identity(link.conn, self.tenant)
            except PeerRejected as exc:
                link.release("controller refused")
                policy.probe_failed(time.time())
                log.warning(
                    "QUIC probe reached a controller that is not ours (%s); staying on TCP",
                    exc.reason,
                    extra={"event": "carrier-probe", "ok": False},
                )
                continue
            policy.probe_succeeded(time.time())
            self._promoted = link
            log.info(
                "QUIC to %s works again: moving the session from TCP to QUIC",
                target,
                extra={"event": "carrier-move", "controller": str(target.entry)},
            )
            tcp.close(ErrorCode.NO_ERROR, "moving to QUIC")
            return

    def _remember_carrier(self) -> None:
        memory = self.carriers.remembered()
        if memory == self._remembered:
            return
        self._remembered = memory
        try:
            atomic_write(self.config.state / CARRIER_FILE, memory.to_json())
        except OSError as exc:
            log.warning("could not write %s: %s", CARRIER_FILE, exc)

    def _recall_carrier(self) -> None:
        """The carrier remembered from the last run (agent.carrier_policy bounds its use)."""
        path = self.config.state / CARRIER_FILE
        try:
            with path.open("rb") as f:
                data = f.read(MAX_MEMORY_BYTES + 1)
        except OSError:
            data = b""
        self._remembered = Remembered.from_json(data) if data else None
        self.carriers = self._new_policy(self._remembered)
        if self.carriers.holding(time.time()):
            log.info(
                "QUIC failed at %s, TCP worked: connecting over TCP until QUIC is tried again",
                time.strftime("%H:%M:%S", time.localtime(self.carriers.quic_failed_at)),
                extra={"event": "carrier-remembered", "transport": "tcp"},
            )

    def _new_policy(self, remembered: Remembered | None) -> CarrierPolicy:
        cfg = self.config
        return CarrierPolicy(
            cfg.quic_timeout, cfg.quic_retry, now=time.time(), remembered=remembered
        )

    def _controller_refused(self, target: Target, reason: str) -> str:
        """The controller at ``target`` is not our tenant's: counted as a refusal."""
        self.counters["refusals"] += 1
        self.controller_id = None
        log.error(
            "refusing the controller at %s: %s",
            target,
            reason,
            extra={"event": "controller-refused", "reason": reason},
        )
        return f"controller refused: {reason}"

    def _write_status(self, *, connected: bool) -> None:
        target = self.target
        info = {
            "device": self.device_id,
            "tenant": self.tenant,
            "connected": connected,
            # the controller connected to, else the one dialled last (or first in the order)
            "controller": str(target.entry if target else self.order.entries[0]),
            "controller_address": target.endpoint if target else None,
            "controllers": [str(entry) for entry in self.order.entries],
            "updated": time.time(),
            "last_error": self.last_error,
            "controller_id": self.controller_id,
            # the carrier of the session up now, else of the last one (None: none yet)
            "transport": self.transport.value if self.transport else None,
            **self.counters,
        }
        try:
            atomic_write(self.config.state / "agent-status.json", json.dumps(info).encode())
        except OSError as exc:
            log.warning("could not write agent-status.json: %s", exc)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that ended a session (a refusal at hello arrives as a one-leaf group)."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
