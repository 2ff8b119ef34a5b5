"""Desired state on the agent: receive a push, verify it end to end, apply it atomically, and
keep running it, from disk, whether or not the controller is reachable.

A push is applied only after the controller ended the stream cleanly and every check passed
(signature by the tenant key pinned at enrolment, device, tenant, no rollback, not expired,
every blob's digest): a torn stream raises out of ``receive`` and nothing is touched. On
success the blobs and the manifest are made durable (blobs first, then the manifest pointer,
atomically), the reconciler converges, and only then does the trust state advance.

Each document is parsed and checked once, here at the trust boundary
(``agent.desired_specs.read_specs``); the reconciler is handed the resulting ``CheckedSpecs``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Mapping

import anyio

from agent.desired_specs import read_specs
from agent.desired_store import DesiredStore, DesiredStoreError
from agent.ports import AgentHost, LiveSession
from agent.reconciler import Reconciler
from agent.runtime.defaults import default_runtimes
from agent.runtime.workdirs import secure_state_dir
from agent.status import StatusReporter
from agent.users import workload_user
from margo_stream.durable_io import run_durable
from margo_stream.errors import (
    ConfigError,
    DocumentError,
    IdentityError,
    RemoteProtocolError,
    TrustError,
)
from margo_stream.identity.trust import load_signing_pub
from margo_stream.protocol import messages as m
from margo_stream.protocol.codes import Refusal, StreamKind
from margo_stream.protocol.push import DEFAULT_MAX_PUSH_BYTES, PushAssembler
from margo_stream.state.manifest import blob_digests, parse_manifest, signature_valid
from margo_stream.state.status import DeploymentState, DeploymentStatus, StatusError
from margo_stream.state.trust import DesiredStateVerifier, Verdict
from margo_stream.transport.connection import MessageStream

log = logging.getLogger("margo.agent.desired")

MAX_PUSH_BYTES = DEFAULT_MAX_PUSH_BYTES


class Overlay(Mapping[str, bytes]):
    """The blobs of a push over the blobs held, read-only (the push's blobs win)."""

    def __init__(self, top: Mapping[str, bytes], under: Mapping[str, bytes]) -> None:
        self._top = top
        self._under = under

    def __getitem__(self, digest: str) -> bytes:
        data = self._top.get(digest)
        return data if data is not None else self._under[digest]

    def __contains__(self, digest: object) -> bool:
        return digest in self._top or digest in self._under

    def __iter__(self) -> Iterator[str]:
        yield from self._top
        yield from (d for d in self._under if d not in self._top)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class DesiredFeature:
    def __init__(self, agent: AgentHost, status: StatusReporter) -> None:
        state = agent.config.state
        run_as = workload_user(agent.config)  # ConfigError if it cannot be used
        secure_state_dir(state, traversable=run_as.switches)
        self.store = DesiredStore(state)
        try:
            self.root_key = load_signing_pub(agent.creds.root_pub_path)
            self.verifier = DesiredStateVerifier(
                agent.tenant, agent.device_id, self.root_key, state / "desired" / "trust.json"
            )
        except (IdentityError, TrustError) as exc:
            raise ConfigError(str(exc)) from None
        self._incoming: dict[str, bytes] = {}
        self.reconciler = Reconciler(
            state,
            read_blob=self._read_blob,
            on_status=status.on_status,
            runtimes=default_runtimes(run_as=run_as),
        )
        self._report = status.on_status
        # one push applied at a time; an uncontended push takes it without a turn of the loop
        self._lock = anyio.Lock(fast_acquire=True)
        agent.background_tasks.append(self.run)
        agent.hello_fields.append(self.hello_fields)
        agent.session_tasks.append(self.adopt_root)
        agent.stream_handlers[StreamKind.DESIRED] = self.handle_stream

    # --- offline autonomy ----------------------------------------------------------------------
    async def run(self) -> None:
        async with self.reconciler:
            await self.restore()
            await anyio.sleep_forever()

    async def restore(self) -> None:
        try:
            current = self.store.load_current()
            if current is None:
                return
            manifest_bytes, signature = current
            root = self.verifier.root
            keys = root.role_keys("controller")[0].values() if root is not None else ()
            if not any(signature_valid(manifest_bytes, signature, k) for k in keys):
                raise DesiredStoreError(
                    "the stored manifest's signature does not verify with a controller key of "
                    "the held root metadata"
                )
            manifest = parse_manifest(manifest_bytes)
            specs = read_specs(manifest, self.store.blobs())
        except (DesiredStoreError, DocumentError, KeyError) as exc:
            log.error(
                "cannot restore the last applied desired state: %s",
                exc,
                extra={"event": "restore-failed"},
            )
            return
        async with self._lock:
            await self.reconciler.apply(manifest.manifest_version, specs)
        log.info(
            "restored manifest version %d from disk (%d deployments)",
            manifest.manifest_version,
            len(specs),
            extra={"event": "desired-restored"},
        )

    async def adopt_root(self, session: LiveSession) -> None:
        """The controller's answer to the hello carries the tenant's root metadata versions
        newer than ours: check and keep them now (synchronously, first thing in the session),
        so terminal grants and the next push are checked against the newest root."""
        chain = session.ack.root
        if not chain:
            return
        try:
            root = self.verifier.adopt_root(chain, dt.datetime.now(dt.UTC))
        except TrustError as exc:
            log.warning(
                "refused the tenant's root metadata: %s",
                exc,
                extra={"event": "root-refused", "refusal": exc.refusal},
            )
            return
        log.info("root metadata version %d trusted", root.version, extra={"event": "root-adopted"})

    def hello_fields(self) -> dict[str, object]:
        return {
            "manifest_version": self.verifier.held_version,
            "manifest_digest": self.verifier.held_digest,
            "root_version": self.verifier.root_version,
            "blobs": sorted(self.store.held_digests())[:4096],
        }

    # --- pushes ------------------------------------------------------------------------------------
    async def handle_stream(self, session: LiveSession, stream: MessageStream) -> None:
        first = await stream.receive()
        assert isinstance(first, m.Desired)  # the stream table guarantees the opener
        try:
            assembler = PushAssembler(first, max_bytes=MAX_PUSH_BYTES)
            while (message := await stream.receive()) is not None:
                refused = assembler.receive(message)
                if refused is not None:
                    result = m.DesiredResult(
                        version=first.version,
                        ok=False,
                        code=Refusal(refused.code),
                        reason=refused.reason,
                    )
                    stream.send(result, end=True)
                    return
            push = assembler.finish()  # the controller ended the stream cleanly
        except RemoteProtocolError as exc:
            log.warning("push of version %d broke the protocol: %s", first.version, exc)
            stream.reset(exc.code)
            return
        async with self._lock:
            if not push.desired.root and self.verifier.root is None:
                # the root came with the hello's answer, and this push overtook its adoption
                await DesiredFeature.adopt_root(self, session)
            result = await self.apply(push.desired, push.blobs)
        stream.send(result, end=True)

    def _read_blob(self, digest: str) -> bytes:
        """Blobs of the push being applied first (they may still be on their way to disk)."""
        data = self._incoming.get(digest)
        return data if data is not None else self.store.get_blob(digest)

    async def apply(self, push: m.Desired, received: dict[str, bytes]) -> m.DesiredResult:
        version = push.version
        available = Overlay(received, self.store.blobs())
        try:
            verdict = self.verifier.verify(
                push.manifest,
                push.signature,
                available,
                now=dt.datetime.now(dt.UTC),
                root=push.root,
            )
            if verdict.unchanged:
                return m.DesiredResult(version=version, ok=True, unchanged=True)
            specs = read_specs(verdict.manifest, available)
        except TrustError as exc:
            log.warning(
                "refused manifest version %d: %s",
                version,
                exc,
                extra={"event": "desired-refused", "refusal": exc.refusal},
            )
            if exc.deployment_id is not None:
                # the operator sees on the deployment itself why the device does not run it
                # (the device keeps running what it ran)
                error = StatusError(code=exc.refusal, source="agent", message=str(exc)[:1000])
                self._report(
                    DeploymentStatus(
                        deployment_id=exc.deployment_id,
                        manifest_version=version,
                        state=DeploymentState.FAILED,
                        error=error,
                    )
                )
            return m.DesiredResult(version=version, ok=False, code=exc.refusal, reason=str(exc))
        except DocumentError as exc:
            return m.DesiredResult(
                version=version, ok=False, code=Refusal.INVALID_DOCUMENT, reason=str(exc)
            )
        # Verified in full: nothing of it is untrusted any more. Persisting it (fsyncs, on a
        # worker thread) and converging the workloads run side by side, so the workloads do not
        # wait for the disk; the trust state advances only once both are done.
        needed = {
            d: available[d] for d in blob_digests(verdict.manifest) if not self.store.has_blob(d)
        }
        self._incoming = needed
        stored: list[BaseException] = []

        async def persist() -> None:
            try:
                await run_durable(self.store.install, needed, push.manifest, push.signature)
            except (DesiredStoreError, OSError) as exc:
                stored.append(exc)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(persist)
                await self.reconciler.apply(version, specs)
        finally:
            self._incoming = {}
        if stored:
            log.error(
                "manifest version %d runs but could not be stored: %s",
                version,
                stored[0],
                extra={"event": "desired-store-failed"},
            )
            return m.DesiredResult(
                version=version, ok=False, code=Refusal.STORE_FAILED, reason=str(stored[0])
            )
        await run_durable(self._commit, verdict)
        log.info(
            "applied manifest version %d (%d deployments)",
            version,
            len(specs),
            extra={"event": "desired-applied"},
        )
        return m.DesiredResult(version=version, ok=True)

    def _commit(self, verdict: Verdict) -> None:
        self.verifier.accept(verdict)
        try:
            self.store.gc(keep=set(blob_digests(verdict.manifest)))
        except OSError as exc:
            log.warning("blob garbage collection failed: %s", exc)


def install(agent: AgentHost) -> DesiredFeature:
    status = StatusReporter(agent)
    return DesiredFeature(agent, status)
