"""The reconciler: makes what runs on the device match the desired deployments.

Theory of operation
-------------------
``apply(manifest_version, desired)`` is called with every newly adopted manifest. The pure
function :func:`plan` compares the specs that actually run with the desired ones and returns
actions: ``stop`` components that disappeared, ``restart`` components whose spec changed
(command, env/parameters, restart policy, working dir, properties, profile, or the deployment's
files), ``start`` new components, and ``remove`` deployments absent from the desired list (a
deployment is deleted only by its absence). Identical components are left untouched, so
applying the same list twice does nothing the second time.

Deployments are worked on concurrently; within one, old runners are stopped first, then the
deployment's files are materialised (each written atomically, digest verified), then new
runners are started in the reconciler's task group. What was really started is recorded as the
running spec: a component that could not be started (no runtime, files unavailable) is absent
from it, so the next ``apply`` tries again.

Status: every change of a deployment's status (state, per-component states, error, adopted
manifest version) is queued, in order, and delivered to ``on_status`` by one task. A new
deployment goes ``pending`` -> ``installing`` -> ``installed``/``failed``; a removed one goes
``removing`` -> ``removed``; crashes and recoveries reported by runners after ``apply`` produce
updates too. ``current_statuses()`` is the latest status per deployment, for re-sending after a
reconnect.

Lifetime: ``async with Reconciler(...)`` (or ``await tg.start(reconciler.run)``) owns the task
group in which runners and the status task live. Leaving it calls :meth:`shutdown`: every
process is stopped (SIGTERM, then SIGKILL after the grace period), while compose/helm workloads
are left to their tools.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import logging
import os
import shutil
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType

import anyio
from anyio.abc import TaskGroup, TaskStatus

from agent.desired_specs import CheckedSpecs, check_specs, validate
from agent.runtime.base import ComponentPaths, ComponentRunner, Runtime, deployment_dir_for
from agent.runtime.defaults import default_runtimes
from margo_stream.errors import DocumentError
from margo_stream.fsutil import atomic_write
from margo_stream.state.spec import ComponentSpec, DeploymentSpec, FileSpec, ProfileType
from margo_stream.state.status import (
    ComponentStatus,
    DeploymentState,
    DeploymentStatus,
    StatusError,
    overall_state,
)

log = logging.getLogger(__name__)

SOURCE = "agent"
StatusCallback = Callable[[DeploymentStatus], Awaitable[None] | None]
BlobReader = Callable[[str], bytes | Awaitable[bytes]]
_MAX_REMOVED_STATUSES = 256
_MAX_QUEUED_STATUSES = 4096

__all__ = ["Action", "ActionKind", "Reconciler", "component_changes", "plan", "validate"]


# -- planning (pure) ---------------------------------------------------------------------------


class ActionKind(enum.StrEnum):
    STOP = "stop"  # stop a component (removed from its deployment, or its deployment removed)
    REMOVE = "remove"  # forget a deployment absent from desired (after its components' stops)
    RESTART = "restart"  # stop the running component, start it with the new spec
    START = "start"  # start a component that does not run yet


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    deployment_id: str
    component: str | None = None  # None for REMOVE
    spec: ComponentSpec | None = None  # the desired spec, for START and RESTART
    reason: str = field(default="", compare=False)


_COMPARED_FIELDS = ("profile", "command", "env", "restart", "working_dir", "properties")


def component_changes(old: ComponentSpec, new: ComponentSpec) -> list[str]:
    """Names of the fields that differ between two specs of one component."""
    return [f for f in _COMPARED_FIELDS if getattr(old, f) != getattr(new, f)]


def plan(running: Mapping[str, DeploymentSpec], desired: Sequence[DeploymentSpec]) -> list[Action]:
    """Actions turning ``running`` into ``desired``: removals first (deployments in sorted
    order), then per desired deployment, in the given order, its stops, restarts and starts.

    Raises ``ValueError`` if a deployment id or a component name within one is repeated.
    """
    seen: set[str] = set()
    for dep in desired:
        if dep.deployment_id in seen:
            raise ValueError(f"deployment {dep.deployment_id!r} is listed twice")
        seen.add(dep.deployment_id)
        names = [c.name for c in dep.components]
        if len(set(names)) != len(names):
            raise ValueError(f"deployment {dep.deployment_id!r} repeats a component name")

    actions: list[Action] = []
    for dep_id in sorted(running):
        if dep_id in seen:
            continue
        for comp in running[dep_id].components:
            actions.append(Action(ActionKind.STOP, dep_id, comp.name, reason="deployment removed"))
        actions.append(Action(ActionKind.REMOVE, dep_id, reason="absent from desired state"))

    for dep in desired:
        dep_id = dep.deployment_id
        old = running.get(dep_id)
        if old is None:
            for comp in dep.components:
                actions.append(Action(ActionKind.START, dep_id, comp.name, comp, "new deployment"))
            continue
        files_changed = set(old.files) != set(dep.files)
        old_components = {c.name: c for c in old.components}
        wanted = {c.name for c in dep.components}
        for comp in old.components:
            if comp.name not in wanted:
                actions.append(
                    Action(ActionKind.STOP, dep_id, comp.name, reason="component removed")
                )
        for comp in dep.components:
            prev = old_components.get(comp.name)
            if prev is None:
                actions.append(Action(ActionKind.START, dep_id, comp.name, comp, "new component"))
                continue
            changes = component_changes(prev, comp) + (["files"] if files_changed else [])
            if changes:
                reason = ", ".join(changes) + " changed"
                actions.append(Action(ActionKind.RESTART, dep_id, comp.name, comp, reason))
    return actions


# -- the reconciler ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Deployment:
    spec: DeploymentSpec
    components: dict[str, ComponentStatus]
    error: StatusError | None = None
    phase: DeploymentState | None = None  # REMOVING / REMOVED while being deleted


class Reconciler:
    """Runs the desired deployments through their runtimes and reports their status."""

    def __init__(
        self,
        state_dir: Path | str,
        read_blob: BlobReader,
        on_status: StatusCallback,
        runtimes: Mapping[ProfileType, Runtime] | None = None,
        *,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self._read_blob = read_blob
        self._on_status = on_status
        self.runtimes: dict[ProfileType, Runtime] = dict(
            runtimes if runtimes is not None else default_runtimes()
        )
        self._shutdown_timeout = shutdown_timeout
        self._tg: TaskGroup | None = None
        self._lock = anyio.Lock()
        self._closed = False
        self._manifest_version = 0
        self._running: dict[str, DeploymentSpec] = {}
        self._deployments: dict[str, _Deployment] = {}
        self._runners: dict[tuple[str, str], ComponentRunner] = {}
        self._last: dict[str, DeploymentStatus] = {}
        self._queue: deque[DeploymentStatus] = deque()
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()

    # -- lifetime ------------------------------------------------------------------------------
    async def __aenter__(self) -> Reconciler:
        if self._tg is not None:
            raise RuntimeError("the reconciler is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._deliver)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._shutdown_timeout):
            await self.shutdown()
        tg.cancel_scope.cancel()  # the status task; runners killed themselves if still there
        try:
            # Not handing the body's exception to the group: it propagates unwrapped.
            await tg.__aexit__(None, None, None)
        finally:
            self._tg = None
        return None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the supervising task group until cancelled; then shut down."""
        async with self:
            task_status.started()
            await anyio.sleep_forever()

    async def shutdown(self) -> None:
        """Stop every component (processes are killed; compose/helm workloads stay) and
        deliver the statuses still queued. Later ``apply`` calls raise ``RuntimeError``."""
        self._closed = True
        async with self._lock:
            runners = list(self._runners.values())
            self._runners.clear()
            async with anyio.create_task_group() as tg:
                for runner in runners:
                    tg.start_soon(partial(runner.stop, remove=False))
        if self._tg is not None:
            with anyio.move_on_after(5.0):
                await self.flush()

    # -- observation ---------------------------------------------------------------------------
    def current_statuses(self) -> dict[str, DeploymentStatus]:
        """The latest status of every deployment (removed ones included), by deployment id."""
        return dict(self._last)

    def running(self) -> dict[str, DeploymentSpec]:
        """The specs that really run (components that could not start are left out)."""
        return dict(self._running)

    def runner(self, deployment_id: str, component: str) -> ComponentRunner | None:
        return self._runners.get((deployment_id, component))

    @property
    def manifest_version(self) -> int:
        return self._manifest_version

    async def flush(self) -> None:
        """Wait until every queued status was handed to ``on_status``."""
        while self._queue or not self._idle.is_set():
            await self._idle.wait()

    # -- apply ---------------------------------------------------------------------------------
    async def apply(
        self, manifest_version: int, desired: CheckedSpecs | Sequence[DeploymentSpec]
    ) -> None:
        """Make the running deployments match ``desired`` (the whole desired state).

        Returns once components are stopped and started (not once they are healthy: watch the
        statuses for that). Specs not yet checked (not ``CheckedSpecs``) are checked first:
        ``DocumentError`` for specs that cannot be run at all, before changing anything.
        """
        checked = desired if isinstance(desired, CheckedSpecs) else check_specs(desired)
        specs = checked.specs
        async with self._lock:
            if self._closed or self._tg is None:
                raise RuntimeError("the reconciler is not running")
            try:
                actions = plan(self._running, specs)
            except ValueError as exc:
                raise DocumentError(str(exc)) from exc
            self._manifest_version = manifest_version
            by_deployment: dict[str, list[Action]] = {}
            for action in actions:
                by_deployment.setdefault(action.deployment_id, []).append(action)
            for action in actions:
                log.info(
                    "%s %s/%s: %s",
                    action.kind,
                    action.deployment_id,
                    action.component or "-",
                    action.reason,
                )
            desired_by_id = {d.deployment_id: d for d in specs}
            async with anyio.create_task_group() as tg:
                for dep_id, dep_actions in by_deployment.items():
                    tg.start_soon(self._execute, dep_id, dep_actions, desired_by_id.get(dep_id))
            for dep in specs:
                if dep.deployment_id not in by_deployment:  # untouched: adopt metadata
                    self._running[dep.deployment_id] = dep
                    known = self._deployments.get(dep.deployment_id)
                    if known is None:  # a new deployment without components
                        self._deployments[dep.deployment_id] = _Deployment(dep, {})
                    else:
                        known.spec = dep
                    self._emit(dep.deployment_id)  # the adopted manifest version moved on

    async def _execute(
        self, dep_id: str, actions: list[Action], desired: DeploymentSpec | None
    ) -> None:
        try:
            if desired is None:
                await self._remove(dep_id)
            else:
                await self._update(desired, actions)
        except Exception as exc:  # a bug here must not take other deployments down
            log.exception("reconciling %s failed", dep_id)
            dep = self._deployments.get(dep_id)
            if dep is not None:
                dep.error = StatusError("agent-error", SOURCE, f"reconciling failed: {exc!r}")
                self._emit(dep_id)

    async def _remove(self, dep_id: str) -> None:
        dep = self._deployments.get(dep_id)
        if dep is None:
            self._running.pop(dep_id, None)
            return
        dep.phase = DeploymentState.REMOVING
        self._emit(dep_id)
        await self._stop_runners(
            [
                self._runners.pop((dep_id, name))
                for name in list(dep.components)
                if (dep_id, name) in self._runners
            ],
            remove=True,
        )
        await anyio.to_thread.run_sync(
            partial(shutil.rmtree, deployment_dir_for(self.state_dir, dep_id), ignore_errors=True)
        )
        dep.phase = DeploymentState.REMOVED
        dep.error = None
        self._emit(dep_id)
        del self._deployments[dep_id]
        self._running.pop(dep_id, None)
        removed = [k for k, s in self._last.items() if s.state is DeploymentState.REMOVED]
        for key in removed[:-_MAX_REMOVED_STATUSES]:
            del self._last[key]

    async def _update(self, desired: DeploymentSpec, actions: list[Action]) -> None:
        dep_id = desired.deployment_id
        old_running = self._running.get(dep_id)
        dep = self._deployments.get(dep_id)
        if dep is None:
            dep = _Deployment(
                desired,
                {
                    c.name: ComponentStatus(c.name, DeploymentState.PENDING)
                    for c in desired.components
                },
            )
            self._deployments[dep_id] = dep
            self._emit(dep_id)
        starting = [a for a in actions if a.kind in (ActionKind.START, ActionKind.RESTART)]
        stopping = [a for a in actions if a.kind in (ActionKind.STOP, ActionKind.RESTART)]

        # Old runners go first: their late reports are ignored from here on.
        to_stop: list[tuple[ComponentRunner, bool]] = []
        for action in stopping:
            assert action.component is not None
            runner = self._runners.pop((dep_id, action.component), None)
            if runner is not None:
                new_profile = action.spec.profile if action.spec is not None else None
                to_stop.append((runner, new_profile != runner.spec.profile))
        dep.spec = desired
        previous = dep.components
        dep.components = {
            c.name: previous.get(c.name, ComponentStatus(c.name, DeploymentState.PENDING))
            for c in desired.components
        }
        for action in starting:
            assert action.component is not None
            dep.components[action.component] = ComponentStatus(
                action.component, DeploymentState.INSTALLING
            )
        dep.error = None
        self._emit(dep_id)
        async with anyio.create_task_group() as tg:
            for runner, remove in to_stop:
                tg.start_soon(partial(runner.stop, remove=remove))
        for action in actions:
            if action.kind is ActionKind.STOP and action.component is not None:
                await anyio.to_thread.run_sync(self._forget_component, dep_id, action.component)

        running_files: tuple[FileSpec, ...] = old_running.files if old_running else ()
        files_error: StatusError | None = None
        if old_running is None or set(old_running.files) != set(desired.files):
            files_error = await self._materialise(desired)
            running_files = () if files_error else desired.files

        started: set[str] = set()
        for action in starting:
            assert action.spec is not None
            if files_error is not None:
                self._component_failed(dep, action.spec.name, files_error)
                continue
            if await self._start(action.spec):
                started.add(action.spec.name)
        dep.error = files_error
        keep = {name for name in dep.components if (dep_id, name) in self._runners}
        self._running[dep_id] = dataclasses.replace(
            desired,
            components=tuple(c for c in desired.components if c.name in keep | started),
            files=running_files,
        )
        self._emit(dep_id)

    def _forget_component(self, dep_id: str, name: str) -> None:
        """Delete the default working directory and logs of a component that was removed."""
        base = deployment_dir_for(self.state_dir, dep_id)
        if name != "files":  # that name's default working directory is the files directory
            shutil.rmtree(base / name, ignore_errors=True)
        for log_name in (f"{name}.log", f"{name}.log.1"):
            (base / log_name).unlink(missing_ok=True)

    async def _start(self, spec: ComponentSpec) -> bool:
        dep_id = spec.deployment_id
        dep = self._deployments[dep_id]
        runtime = self.runtimes.get(spec.profile)
        if runtime is None:
            error = StatusError(
                "runtime-unsupported", SOURCE, f"this agent has no {spec.profile} runtime"
            )
            self._component_failed(dep, spec.name, error)
            return False
        key = (dep_id, spec.name)
        holder: list[ComponentRunner] = []

        def on_change(status: ComponentStatus) -> None:
            if holder and self._runners.get(key) is holder[0]:
                self._component_changed(dep_id, status)

        paths = ComponentPaths.for_component(self.state_dir, spec)
        runner = runtime.create(spec, paths, on_change)
        holder.append(runner)
        self._runners[key] = runner
        assert self._tg is not None
        await self._tg.start(runner.run)
        return True

    def _component_failed(self, dep: _Deployment, name: str, error: StatusError) -> None:
        dep.components[name] = ComponentStatus(name, DeploymentState.FAILED, error)
        self._emit(dep.spec.deployment_id)

    def _component_changed(self, dep_id: str, status: ComponentStatus) -> None:
        dep = self._deployments.get(dep_id)
        if dep is None or dep.phase is not None or status.name not in dep.components:
            return
        dep.components[status.name] = status
        self._emit(dep_id)

    async def _stop_runners(self, runners: list[ComponentRunner], *, remove: bool) -> None:
        async with anyio.create_task_group() as tg:
            for runner in runners:
                tg.start_soon(partial(runner.stop, remove=remove))

    # -- files ---------------------------------------------------------------------------------
    async def _materialise(self, spec: DeploymentSpec) -> StatusError | None:
        """Write the deployment's files (digest-checked, each atomically); prune stale ones."""
        files_dir = deployment_dir_for(self.state_dir, spec.deployment_id) / "files"
        for f in spec.files:
            try:
                data = self._read_blob(f.digest)
                if inspect.isawaitable(data):
                    data = await data
            except Exception as exc:
                return StatusError(
                    "blob-missing", SOURCE, f"file {f.name!r}: blob {f.digest} unavailable: {exc}"
                )
            assert isinstance(data, bytes | bytearray | memoryview)
            algorithm, _, expected = f.digest.partition(":")
            if algorithm != "sha256" or hashlib.sha256(data).hexdigest() != expected:
                return StatusError(
                    "blob-digest-mismatch",
                    SOURCE,
                    f"file {f.name!r}: content does not match {f.digest}",
                )
            try:
                await anyio.to_thread.run_sync(_write_file, files_dir / f.name, bytes(data))
            except OSError as exc:
                return StatusError("file-write-failed", SOURCE, f"file {f.name!r}: {exc}")
        await anyio.to_thread.run_sync(_prune, files_dir, {f.name for f in spec.files})
        return None

    # -- status delivery -----------------------------------------------------------------------
    def _snapshot(self, dep: _Deployment) -> DeploymentStatus:
        dep_id = dep.spec.deployment_id
        if dep.phase is not None:
            comps = tuple(ComponentStatus(name, dep.phase) for name in dep.components)
            return DeploymentStatus(dep_id, self._manifest_version, dep.phase, comps)
        comps = tuple(dep.components.values())
        error = dep.error or next(
            (c.error for c in comps if c.state is DeploymentState.FAILED and c.error), None
        )
        state = DeploymentState.FAILED if dep.error else overall_state(comps)
        return DeploymentStatus(dep_id, self._manifest_version, state, comps, error)

    def _emit(self, dep_id: str) -> None:
        dep = self._deployments.get(dep_id)
        if dep is None:
            return
        status = self._snapshot(dep)
        if self._last.get(dep_id) == status:
            return
        self._last.pop(dep_id, None)  # keep insertion order = order of last change
        self._last[dep_id] = status
        self._queue.append(status)
        if len(self._queue) > _MAX_QUEUED_STATUSES:  # a stuck consumer: keep the latest each
            latest = {s.deployment_id: s for s in self._queue}
            self._queue = deque(latest.values())
        if self._idle.is_set():
            self._idle = anyio.Event()
        self._wake.set()

    async def _deliver(self) -> None:
        while True:
            while self._queue:
                status = self._queue.popleft()
                try:
                    result = self._on_status(status)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("status callback failed for %s", status.deployment_id)
            self._idle.set()
            await self._wake.wait()
            self._wake = anyio.Event()


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    # 0644 whatever the agent's umask (077): containers may read a bind-mounted file as any
    # user; the directories gate who reaches it (agent.runtime.workdirs)
    os.chmod(path, 0o644)


def _prune(files_dir: Path, keep: set[str]) -> None:
    """Remove files (and then-empty directories) under ``files_dir`` not named in ``keep``."""
    if not files_dir.is_dir():
        return
    for root, dirs, files in os.walk(files_dir, topdown=False):
        for name in files:
            path = Path(root) / name
            if path.relative_to(files_dir).as_posix() not in keep:
                path.unlink(missing_ok=True)
        for name in dirs:
            try:
                (Path(root) / name).rmdir()
            except OSError:
                pass  # not empty
