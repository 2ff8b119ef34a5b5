"""The runtime interface: how the reconciler starts, stops and watches one component.

Theory of operation
-------------------
A :class:`Runtime` exists once per profile type (process, compose, helm.v3). For every component
the reconciler wants running it asks the runtime for a :class:`ComponentRunner` and starts the
runner's :meth:`ComponentRunner.run` in the reconciler's task group with ``await tg.start(...)``.
``run`` supervises the component (spawning, restarting, bringing a compose project up, ...) until
:meth:`ComponentRunner.stop` is awaited, and then returns; it never outlives its task group: when
cancelled from outside it kills what it started before returning.

A runner reports every change of its :class:`ComponentStatus` synchronously through the
``on_change`` callback it was created with; the reconciler turns those into deployment statuses.

Files on disk, per deployment (``STATE`` is the agent's state directory)::

    STATE/work/<deployment>/files/<name>        extra files of the deployment
    STATE/work/<deployment>/<component>/        default working directory of a component
    STATE/work/<deployment>/<component>.log     stdout + stderr of a process component

This module names no concrete runtime: ``agent.runtime.defaults`` assembles them.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from margo_stream.state.spec import ComponentSpec, ProfileType
from margo_stream.state.status import ComponentStatus, DeploymentState

StatusSink = Callable[[ComponentStatus], None]

# Deployment ids and component names become directory and file names.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,199}$")


def is_safe_name(name: str) -> bool:
    """True if ``name`` can be used as a single path component under the state directory."""
    return bool(_SAFE_NAME.match(name))


@dataclass(frozen=True, slots=True)
class ComponentPaths:
    """Where one component lives on disk."""

    deployment_dir: Path
    files_dir: Path
    working_dir: Path
    log_path: Path

    @classmethod
    def for_component(cls, state_dir: Path, spec: ComponentSpec) -> ComponentPaths:
        deployment_dir = deployment_dir_for(state_dir, spec.deployment_id)
        # A relative working_dir is taken relative to the deployment's directory.
        working = deployment_dir / (spec.working_dir or spec.name)
        return cls(
            deployment_dir=deployment_dir,
            files_dir=deployment_dir / "files",
            working_dir=working,
            log_path=deployment_dir / f"{spec.name}.log",
        )


def deployment_dir_for(state_dir: Path, deployment_id: str) -> Path:
    return Path(state_dir) / "work" / deployment_id


class ComponentRunner(abc.ABC):
    """One component under supervision. Created by a :class:`Runtime`, driven by the reconciler."""

    def __init__(self, spec: ComponentSpec, paths: ComponentPaths, on_change: StatusSink) -> None:
        self.spec = spec
        self.paths = paths
        self._on_change = on_change
        self._status = ComponentStatus(name=spec.name, state=DeploymentState.PENDING)
        self._stop_requested = anyio.Event()
        self._finished = anyio.Event()
        self._remove_on_stop = True

    @property
    def status(self) -> ComponentStatus:
        """The latest status of this component."""
        return self._status

    @property
    def finished(self) -> bool:
        """True once :meth:`run` has returned."""
        return self._finished.is_set()

    def _set_status(self, status: ComponentStatus) -> None:
        """Record ``status`` and report it if it differs; silent once a stop was requested."""
        if status == self._status:
            return
        self._status = status
        if not self._stop_requested.is_set():
            self._on_change(status)

    @abc.abstractmethod
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Supervise the component until :meth:`stop`; call ``task_status.started()`` early."""

    async def stop(self, *, remove: bool = True) -> None:
        """Stop the component and wait until :meth:`run` has returned.

        ``remove=False`` is used when the agent shuts down: runtimes whose workloads outlive the
        agent (compose, helm) leave them in place; processes are stopped either way.
        """
        self._remove_on_stop = remove
        self._stop_requested.set()
        self._on_stop_requested()
        await self._finished.wait()

    def _on_stop_requested(self) -> None:  # noqa: B027 - optional hook
        """Hook for subclasses: interrupt work in progress (called from :meth:`stop`)."""


class Runtime(abc.ABC):
    """Runs components of one profile type."""

    profile: ProfileType

    @abc.abstractmethod
    def create(
        self, spec: ComponentSpec, paths: ComponentPaths, on_change: StatusSink
    ) -> ComponentRunner:
        """A runner for ``spec``; nothing starts until its ``run`` is started in a task group."""


RuntimeRegistry = Mapping[ProfileType, Runtime]
