"""The controller process: QUIC listener, live sessions, store, operator API, in one event loop.

Everything runs inside one anyio task group started by ``Controller.run``; cancelling it (or
``shutdown()``) closes every device connection with SHUTTING_DOWN, stops the API and closes
the store. The features (desired state, status, telemetry, terminals) are built once here by
``build_features`` from the store, the registry and this controller as their task spawner;
sessions and the API get the typed parts they use (``controller/ports.py``).

Every device transport admits a certificate through ``self.admission``: the chain against the
tenant's bundle, then the tenant's allow-list (``controller/identities.py``). ``reload`` (SIGHUP,
``POST /api/v1/admin/reload``) re-reads the trust bundles, the fleet-manager certificates, the
operators and the allow files without a restart; when anything fails to load, nothing changes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskGroup

from controller.api.app import create_app
from controller.api.embedded_server import EmbeddedUvicorn
from controller.cluster import new_instance_id
from controller.cluster.factory import open_cluster
from controller.cluster.reactions import ClusterReactions
from controller.config import ControllerConfig
from controller.conn_limits import close_at_limits
from controller.device_api.tls import identity_from_der, server_context, tenant_bundle_paths
from controller.enroll import EnrollServer
from controller.features import build_features
from controller.identities import Admission, IdentityBook
from controller.metrics import ControllerMetrics
from controller.ports import DesiredChangeFanout, DeviceNotifier
from controller.registry import SessionRegistry
from controller.retention import RetentionPolicy, run_retention
from controller.session import ControllerSession, SessionContext
from controller.store.factory import open_store
from controller.workers import ready_file, shares_ports, tcp_socket
from margo_stream.errors import ConfigError, IdentityError, MargoError
from margo_stream.fsutil import atomic_write
from margo_stream.identity.allowed_files import AllowedFile, read_allowed_dir
from margo_stream.identity.fleet_manager import TenantCertificates
from margo_stream.identity.operator_files import OperatorDirectory, scan_operators
from margo_stream.identity.trust import load_server_credentials, load_trust_bundles
from margo_stream.identity.verify import PeerVerifier
from margo_stream.metrics_http import MetricsServer
from margo_stream.protocol.codes import ErrorCode
from margo_stream.transport.channel_connection import ChannelConnection, is_link_loss
from margo_stream.transport.h2_mapping import ALPN_H2
from margo_stream.transport.quic_server import QuicServer, server_configuration, start_server
from margo_stream.transport.stateless_reset import ResetTokens, load_reset_key
from margo_stream.transport.tcp_server import TcpServer, start_tcp_server

log = logging.getLogger("margo.controller")


class Controller:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.ready_file = ready_file(config)  # a worker of --workers has its own
        # the controllers sharing the store (one, on SQLite): device leases, change notices
        self.instance_id = new_instance_id()
        self.cluster = open_cluster(config.store, self.instance_id)
        self.registry = SessionRegistry(self.instance_id, self.cluster)
        self.store = open_store(config)
        self.features = build_features(config, self.store, self.registry, self)
        # --metrics (Prometheus) and --otlp-endpoint read the same metrics
        self.metrics = ControllerMetrics(self.registry, self.features)
        self.metrics_port: int | None = None
        self.sessions = SessionContext(
            store=self.store,
            registry=self.registry,
            hooks=self.features.hooks,
            tasks=self,
            hello_timeout=config.hello_timeout,
            keepalive=config.keepalive,
            roots=self.features.roots,
            cluster=self.cluster,
        )
        # the allow-list: every device transport admits through self.admission
        self.identities = IdentityBook(self.store, self.registry, config.certs, self)
        self.features.hooks.ready.append(self.identities.recheck)
        self.reactions = ClusterReactions(
            self.cluster, self.registry, self.store, self.identities, self._revoked
        )
        publish = None if self.cluster.exclusive else self.reactions.publish_desired
        self.desired = DesiredChangeFanout(self.features.desired, publish)
        self.reactions.desired = self.desired
        if not self.cluster.exclusive:
            self.identities.revoked_listeners.append(
                lambda tenant, device_id: self.reactions.revoked(tenant, device_id, self.spawn)
            )
        self.admission: Admission | None = None
        self._allowed_files: list[AllowedFile] = []
        self._reload_lock = anyio.Lock()
        self._device_servers: list[Any] = []  # RestPollServer, H2PushServer: their TLS trust
        self._enroll_server: EnrollServer | None = None  # --enroll: its tenants and CA trust
        self.identities.revoked_listeners.append(self._revoked)
        self.quic: QuicServer | None = None
        self.quic_port: int | None = None
        self.tcp: TcpServer | None = None  # --tcp-listen: the channel over HTTP/2 and TLS
        self.api_port: int | None = None
        self.verifier: PeerVerifier | None = None
        self.server_certs = TenantCertificates({})  # per tenant, chosen by the TLS server name
        self.operators: OperatorDirectory | None = None  # who each operator token is
        self._tg: TaskGroup | None = None
        self._stop = anyio.Event()
        self._uvicorn: EmbeddedUvicorn | None = None
        self.device_ports: dict[str, int] = {}  # Margo pull API / HTTP/2 push, when enabled

    def add_device_transport(self, name: str, port: int, notifier: DeviceNotifier) -> None:
        """Another way devices reach this controller: it hears of every desired change."""
        self.device_ports[name] = port
        self.desired.add(notifier)

    # --- tasks ----------------------------------------------------------------------------------
    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the controller's task group; failures are logged, not fatal."""
        assert self._tg is not None, "controller is not running"
        self._tg.start_soon(self._guarded, fn, args)

    async def _guarded(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            if not is_link_loss(exc):
                log.exception("background task %s failed", getattr(fn, "__qualname__", fn))

    def shutdown(self) -> None:
        self._stop.set()

    # --- start -----------------------------------------------------------------------------------
    def _load_identity(self) -> Any:
        certs = self.config.certs
        if not certs.is_dir():
            raise ConfigError(
                f"certificate directory {certs} does not exist (run margo-certs init)"
            )
        try:
            self.verifier = PeerVerifier.from_dir(certs)
            self.operators = OperatorDirectory(certs)
            creds = load_server_credentials(certs)
            self.server_certs = TenantCertificates.from_dir(certs, self.verifier.tenants)
            self._allowed_files = read_allowed_dir(certs, self.verifier.tenants)
        except IdentityError as exc:
            raise ConfigError(str(exc)) from None
        if not self.verifier.tenants:
            raise ConfigError(
                f"no tenant CA found under {certs} (run margo-certs init --tenant ...)"
            )
        self.admission = Admission(self.verifier, self.identities)
        return server_configuration(
            str(creds.cert_path),
            str(creds.key_path),
            idle_timeout=self.config.idle_timeout,
            congestion_control=self.config.congestion_control,
        )

    async def reload(self) -> dict[str, Any]:
        """Re-read the tenants' trust bundles, fleet-manager certificates, operators and allow
        files. Everything is read and checked first: on failure (``ConfigError`` saying why,
        also logged) the old state stays in force."""
        assert self.verifier is not None and self.operators is not None, "not started"
        certs = self.config.certs
        async with self._reload_lock:
            try:
                bundles = load_trust_bundles(certs)
                PeerVerifier(bundles, cache_size=0)  # every bundle builds a trust store
                tenants = sorted(bundles)
                scan_operators(certs, strict=True)
                server_certs = TenantCertificates.from_dir(certs, tenants)
                files = read_allowed_dir(certs, tenants)
                bundle_paths = tenant_bundle_paths(certs)
                contexts = [(srv, srv.trust_context(bundle_paths)) for srv in self._device_servers]
                tcp_context = self._tcp_context(bundle_paths) if self.tcp is not None else None
                enroll_swap = (
                    self._enroll_server.retrust(tenants)
                    if self._enroll_server is not None
                    else None
                )
            except (MargoError, OSError, ValueError) as exc:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                log.warning("reload failed, nothing changed: %s", reason)
                raise ConfigError(f"reload failed, nothing changed: {reason}") from None
            self.verifier.reload(bundles)
            self.server_certs.by_tenant = server_certs.by_tenant
            for server, context in contexts:
                server.ssl_context = context
            if self.tcp is not None and tcp_context is not None:
                self.tcp.ssl_context = tcp_context  # new connections verify against these
            if enroll_swap is not None:  # enrolment serves the tenants and CAs of now, too
                enroll_swap()
            self.operators.refresh(force=True)
            changed = await self.identities.load(files)
        log.info(
            "reloaded: tenants %s, %d allow files (%d changed), %d identities",
            ",".join(tenants),
            len(files),
            len(changed),
            len(self.identities.allowlist),
            extra={"event": "controller-reloaded"},
        )
        return {
            "tenants": tenants,
            "allow_files": len(files),
            "identities_changed": len(changed),
            "identities": len(self.identities.allowlist),
        }

    def request_reload(self) -> None:
        """SIGHUP: reload in the background (a failure is logged and changes nothing)."""
        if self._tg is not None:
            self._tg.start_soon(self._reload_logged)

    async def _reload_logged(self) -> None:
        with contextlib.suppress(ConfigError):  # logged by reload
            await self.reload()

    async def _allow(self, tenant: str, device_id: str, key_sha256: str, not_after: float) -> None:
        """An enrolment allowed a key: here, then on the other controllers of the cluster."""
        await self.identities.allow(tenant, device_id, key_sha256, not_after)
        if not self.cluster.exclusive:
            await self.reactions.allowed(tenant, device_id)

    def _revoked(self, tenant: str, device_id: str) -> None:
        """A revocation wakes the device's long-lived streams on the other transports (HTTP/2
        push), which check its identity again and close."""
        for server in self._device_servers:
            server.notify(tenant, [device_id])

    def _accept(self, conn: ChannelConnection, identity: Any) -> None:
        ControllerSession(self.sessions, conn, identity)
        # closed at its certificate's expiry or --max-connection-age, whichever comes first
        self.spawn(close_at_limits, conn, identity, self.config.max_connection_age)

    def _verify(self, leaf: Any, chain: list[Any]) -> Any:
        assert self.admission is not None
        return self.metrics.admitted("quic", self.admission.verify, leaf, chain)

    def _verify_der(self, der: bytes | None) -> Any:
        """The TCP carrier's check: the same admission as QUIC's, on the DER leaf."""
        assert self.admission is not None
        return self.metrics.admitted("tcp", identity_from_der, der, self.admission)

    def _tcp_context(self, bundle_paths: list[Any]) -> ssl.SSLContext:
        """TLS 1.3, client certificate required from any tenant CA (the admission then
        checks it against its own tenant's), ALPN h2, the tenant's fleet-manager certificate
        chosen by the server name as on QUIC."""
        creds = load_server_credentials(self.config.certs)
        return server_context(creds.cert_path, creds.key_path, bundle_paths, alpn=[ALPN_H2])

    async def _serve_tcp(self) -> None:
        cfg = self.config
        if cfg.tcp_host is None:
            return
        try:
            self.tcp = await start_tcp_server(
                cfg.tcp_host,
                cfg.tcp_port,
                self._tcp_context(tenant_bundle_paths(cfg.certs)),
                self._verify_der,
                self._accept,
                handshake_timeout=cfg.handshake_timeout,
                idle_timeout=cfg.idle_timeout,
                reuse_port=shares_ports(),  # a worker of --workers joins the group
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on --tcp-listen {cfg.tcp_host}:{cfg.tcp_port}: "
                f"{exc.strerror or exc}"
            ) from None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[Controller] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        quic_config = self._load_identity()
        self.config.data.mkdir(parents=True, exist_ok=True)
        # a ready file left by a controller that was killed would tell whoever waits for this
        # one that it listens before it does
        self.ready_file.unlink(missing_ok=True)
        await self.store.open()
        try:
            await self.cluster.open()
            # alone on the store: no device is connected yet; in a cluster the leases say
            marked = await self.store.mark_all_disconnected() if self.cluster.exclusive else 0
            await self.identities.load(self._allowed_files)
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self.cluster.run, self.reactions.on_change, self.reactions.on_lost)
                transport, self.quic = await start_server(
                    self.config.listen_host,
                    self.config.listen_port,
                    quic_config,
                    self._verify,
                    self._accept,
                    reset_tokens=ResetTokens(load_reset_key(self.config.data)),
                    choose_certificate=self.server_certs.choose,
                    quic_retry=self.config.quic_retry,
                    handshake_timeout=self.config.handshake_timeout,
                    max_half_open=self.config.max_half_open,
                    max_half_open_per_address=self.config.max_half_open_per_address,
                    # a worker of --workers joins the SO_REUSEPORT group on the QUIC port
                    reuse_port=shares_ports(),
                )
                self.quic_port = transport.get_extra_info("sockname")[1]
                self.metrics.watch_listener("quic", self.quic)
                await self._serve_tcp()
                if self.tcp is not None:
                    self.metrics.watch_listener("tcp", self.tcp)
                await tg.start(self._serve_api)
                await self._serve_device_apis(tg)
                await self._serve_enroll(tg)
                await self._serve_metrics(tg)
                tg.start_soon(self._touch_loop)
                tg.start_soon(run_retention, self.store, RetentionPolicy.from_config(self.config))
                tg.start_soon(self.features.rollouts.run, self.desired, self.cluster.exclusive)
                info = self._ready_info()
                await self.cluster.announce(info["api"], info["quic"])
                atomic_write(self.ready_file, json.dumps(info).encode())
                log.info(
                    "controller listening: quic %s:%d%s, api %s:%d, tenants %s",
                    self.config.listen_host,
                    self.quic_port,
                    f", tcp {info['tcp']}" if "tcp" in info else "",
                    self.config.api_host,
                    self.api_port,
                    ",".join(self.verifier.tenants if self.verifier else []),
                    extra={"event": "controller-ready", "stale_connected_cleared": marked},
                )
                task_status.started(self)
                try:
                    await self._stop.wait()
                finally:
                    with anyio.CancelScope(shield=True):
                        self.quic.close_all(ErrorCode.SHUTTING_DOWN, "controller shutting down")
                        if self.tcp is not None:
                            self.tcp.close_all(ErrorCode.SHUTTING_DOWN, "controller shutting down")
                        await anyio.sleep(0.05)  # let the CONNECTION_CLOSE datagrams leave
                        transport.close()
                        if self._uvicorn is not None:
                            self._uvicorn.stop()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.cluster.close()  # its leases released: devices may go elsewhere
                await self.store.close()
            self.ready_file.unlink(missing_ok=True)
            log.info("controller stopped", extra={"event": "controller-stopped"})

    async def _serve_device_apis(self, tg: TaskGroup) -> None:
        """The non-QUIC device transports: Margo's own REST pull API and HTTP/2 push."""
        cfg = self.config
        wanted = [
            (name, host, port)
            for name, host, port in (
                ("margo_api", cfg.margo_api_host, cfg.margo_api_port),
                ("h2_push", cfg.h2_push_host, cfg.h2_push_port),
            )
            if host is not None
        ]
        if not wanted:
            return
        from controller.device_api.h2_push import H2PushServer, serve_h2_push
        from controller.device_api.rest_poll import RestPollServer, serve_rest_poll

        creds = load_server_credentials(cfg.certs)
        bundles = tenant_bundle_paths(cfg.certs)
        for name, host, port in wanted:
            args = (
                self.store,
                self.admission,
                host,
                port,
                creds.cert_path,
                creds.key_path,
                bundles,
            )
            server: RestPollServer | H2PushServer
            if name == "margo_api":
                server = await tg.start(serve_rest_poll, *args)
            else:
                server = await tg.start(serve_h2_push, *args)
            assert server.port is not None
            self._device_servers.append(server)
            self.add_device_transport(name, server.port, server)

    async def _serve_enroll(self, tg: TaskGroup) -> None:
        """EST enrolment (``--enroll``, controller/enroll.py): certificates for device keys."""
        cfg = self.config
        if cfg.enroll_host is None:
            return
        from controller.enroll import serve_enroll

        assert self.verifier is not None and self.admission is not None
        server = await tg.start(
            functools.partial(
                serve_enroll,
                cfg.certs,
                self.store,
                self.admission,  # simplereenroll: the chain, then the allow-list
                self.verifier.tenants,
                cfg.enroll_host,
                cfg.enroll_port,
                lifetime=cfg.device_cert_lifetime,
                allow=self._allow,  # the store and the allow-list in memory
            )
        )
        assert server.port is not None
        self._enroll_server = server
        self.device_ports["enroll"] = server.port

    async def _serve_metrics(self, tg: TaskGroup) -> None:
        """``--metrics``: Prometheus on its own listener; ``--otlp-endpoint``: OTLP export."""
        cfg = self.config
        if cfg.metrics_host is None and cfg.otlp_endpoint is None:
            return
        tg.start_soon(self.metrics.run_lag_probe)
        if cfg.metrics_host is not None:
            try:
                server = await tg.start(
                    MetricsServer(self.metrics.render).serve, cfg.metrics_host, cfg.metrics_port
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on --metrics {cfg.metrics_host}:{cfg.metrics_port}: "
                    f"{exc.strerror or exc}"
                ) from None
            self.metrics_port = server.port
            self.device_ports["metrics"] = server.port  # in the ready file, as host:port
        if cfg.otlp_endpoint is not None:
            from controller.otlp_export import OtlpExport

            export = OtlpExport(cfg.otlp_endpoint, self.instance_id, self.metrics)
            self.features.telemetry.forward = export
            tg.start_soon(export.run)

    def _ready_info(self) -> dict[str, Any]:
        return {
            "quic": f"{self.config.listen_host}:{self.quic_port}",
            **(
                {"tcp": f"{_url_host(self.config.tcp_host or '')}:{self.tcp.port}"}
                if self.tcp is not None
                else {}
            ),
            "api": f"{'https' if self.config.api_tls_cert else 'http'}://"
            f"{_url_host(self.config.api_host)}:{self.api_port}",
            "pid": os.getpid(),
            "instance": self.instance_id,
            "started": time.time(),
            **{
                name: f"{_url_host(getattr(self.config, name + '_host'))}:{port}"
                for name, port in self.device_ports.items()
            },
        }

    async def _serve_api(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        assert self.operators is not None  # _load_identity ran
        app = create_app(
            store=self.store,
            registry=self.registry,
            operators=self.operators,
            desired=self.desired,
            terminals=self.features.terminals,
            documents=self.features.documents,
            roots=self.features.roots,
            identities=self.identities,
            reload=self.reload,
            max_body=self.config.api_max_body,
            rollouts=self.features.rollouts,
        )
        family = socket.AF_INET6 if ":" in self.config.api_host else socket.AF_INET
        sock = tcp_socket(family)
        try:
            sock.bind((self.config.api_host, self.config.api_port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on --api {self.config.api_host}:"
                f"{self.config.api_port}: {exc.strerror}"
            ) from None
        sock.listen(1024)
        self.api_port = sock.getsockname()[1]
        kwargs: dict[str, Any] = {}
        if self.config.api_tls_cert is not None:
            kwargs = {
                "ssl_certfile": str(self.config.api_tls_cert),
                "ssl_keyfile": str(self.config.api_tls_key),
                "ssl_version": ssl.PROTOCOL_TLS_SERVER,
            }
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
            access_log=False,
            **kwargs,
        )
        self._uvicorn = EmbeddedUvicorn(config)
        task_status.started()
        await self._uvicorn.serve(sockets=[sock])

    async def _touch_loop(self) -> None:
        """Fold the sessions' last-packet times into the registry and, in one batch, the store.

        Only the sessions that received something since their time was last stored are in the
        batch (with keepalives every 20 s and a batch every 5 s, about a quarter of them): the
        others' stored time is already what it would be written as. A batch the store refused
        is sent again with the next one."""
        while True:
            await anyio.sleep(self.config.touch_interval)
            views = self.registry.last_seen_changes(time.time(), anyio.current_time())
            if views:
                try:
                    await self.store.touch_devices(
                        [(v.tenant, v.device_id, v.last_seen) for v in views]
                    )
                except Exception:
                    log.exception("could not record last-seen times")
                    self.registry.last_seen_unstored(views)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
