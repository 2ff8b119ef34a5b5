"""Components run by an external tool through its CLI: ``compose`` (Docker Compose) and
``helm.v3`` (Helm).

Theory of operation
-------------------
The runner checks that the tool is on ``PATH``; if not, the component is ``failed`` with error
code ``runtime-missing`` and nothing is retried (the agent reports what it cannot do). Otherwise
it brings the component up with one idempotent command (``docker compose up -d`` /
``helm upgrade --install``), reports ``installed`` on success, and on failure reports ``failed``
with an excerpt of the tool's stderr and retries with exponential backoff. The workload then
belongs to the tool: the runner waits for :meth:`stop`. A stop with ``remove=True`` (the
component disappeared or changed profile) takes the workload down (``docker compose down`` /
``helm uninstall``); a stop with ``remove=False`` (agent shutdown, in-place update) leaves it.

Names: the compose project is ``<deployment>-<component>`` and the helm release
``<deployment>-<component>``, both folded to the tools' naming rules, so two components of one
deployment never take each other down.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from margo_stream.fsutil import atomic_write
from margo_stream.state.spec import ComponentSpec, ProfileType
from margo_stream.state.status import ComponentStatus, DeploymentState, StatusError

from .base import ComponentPaths, ComponentRunner, Runtime, StatusSink

log = logging.getLogger(__name__)

_STDERR_EXCERPT = 600


class _ToolError(Exception):
    def __init__(self, code: str, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry = retry


def fold_name(text: str, *, max_len: int, allowed: str = "a-z0-9-") -> str:
    """``text`` lowercased with disallowed characters replaced by '-', bounded in length
    (a hash suffix keeps long names distinct)."""
    name = re.sub(f"[^{allowed}]+", "-", text.lower()).strip("-_") or "x"
    if len(name) > max_len:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        name = name[: max_len - 9].rstrip("-_") + "-" + digest
    return name


def stderr_excerpt(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    if len(text) > _STDERR_EXCERPT:
        text = "..." + text[-_STDERR_EXCERPT:]
    return text


class ExternalRunner(ComponentRunner):
    """Shared loop of the CLI-driven runtimes; subclasses say which commands to run."""

    tool: str = ""
    source: str = ""

    def __init__(
        self,
        runtime: ExternalRuntime,
        spec: ComponentSpec,
        paths: ComponentPaths,
        on_change: StatusSink,
    ) -> None:
        super().__init__(spec, paths, on_change)
        self._rt = runtime
        self._work_scope: anyio.CancelScope | None = None
        self._brought_up = False
        self.props = dict(spec.properties)

    # -- subclass interface ----------------------------------------------------------------
    def _prepare(self) -> None:
        """Write whatever the tool needs on disk; raise _ToolError on bad properties."""

    def _up_command(self) -> list[str]:
        raise NotImplementedError

    def _down_command(self) -> list[str]:
        raise NotImplementedError

    def _up_timeout(self) -> float:
        return 600.0

    # -- loop ------------------------------------------------------------------------------
    def _set(self, state: DeploymentState, error: StatusError | None = None) -> None:
        self._set_status(ComponentStatus(name=self.spec.name, state=state, error=error))

    def _on_stop_requested(self) -> None:
        if self._work_scope is not None:
            self._work_scope.cancel()

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self._rt.search_path is not None:
            env["PATH"] = self._rt.search_path
        return env

    def _tool_path(self) -> str | None:
        path = self._rt.search_path
        if path is None:
            path = os.environ.get("PATH", os.defpath)
        return shutil.which(self.tool, path=path)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            with anyio.CancelScope() as self._work_scope:
                if not self._stop_requested.is_set():
                    await self._bring_up()
            self._work_scope = None
            await self._stop_requested.wait()
            if self._remove_on_stop and self._brought_up:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._up_timeout()):
                    await self._bring_down()
        finally:
            self._finished.set()

    async def _bring_up(self) -> None:
        backoff = self._rt.backoff_initial
        self._set(DeploymentState.INSTALLING)
        while True:
            try:
                if self._tool_path() is None:
                    raise _ToolError(
                        "runtime-missing",
                        f"'{self.tool}' not found on PATH: cannot run {self.source} deployments",
                        retry=False,
                    )
                self._prepare()
                self._brought_up = True
                await self._run_tool(self._up_command(), "up", self._up_timeout())
            except _ToolError as exc:
                self._set(DeploymentState.FAILED, StatusError(exc.code, self.source, exc.message))
                if not exc.retry:
                    return
                await anyio.sleep(backoff)  # retry timer; cancelled by stop()
                backoff = min(backoff * 2, self._rt.backoff_max)
                continue
            self._set(DeploymentState.INSTALLED)
            return

    async def _bring_down(self) -> None:
        if self._tool_path() is None:
            return
        try:
            await self._run_tool(self._down_command(), "down", self._up_timeout())
        except _ToolError as exc:
            log.warning("%s/%s: %s", self.spec.deployment_id, self.spec.name, exc.message)

    async def _run_tool(self, argv: Sequence[str], what: str, timeout: float) -> None:
        log.info("%s/%s: %s", self.spec.deployment_id, self.spec.name, " ".join(argv))
        try:
            with anyio.fail_after(timeout):
                result = await anyio.run_process(
                    list(argv),
                    check=False,
                    stdin=subprocess.DEVNULL,
                    env=self._environment(),
                    cwd=self.paths.working_dir,
                )
        except TimeoutError as exc:
            raise _ToolError(
                f"{self.source}-{what}-timeout", f"{argv[0]} {what} timed out after {timeout:g} s"
            ) from exc
        except OSError as exc:
            raise _ToolError(
                f"{self.source}-{what}-failed", f"cannot run {argv[0]!r}: {exc.strerror or exc}"
            ) from exc
        if result.returncode != 0:
            raise _ToolError(
                f"{self.source}-{what}-failed",
                f"{' '.join(argv[:3])} exited with status {result.returncode}: "
                f"{stderr_excerpt(result.stderr)}",
            )


class ComposeRunner(ExternalRunner):
    """``compose`` component. Properties: ``compose`` (the compose file, inline) or
    ``composeFile`` (the name of one of the deployment's files). ``env`` is exported to
    ``docker compose`` for variable interpolation."""

    tool = "docker"
    source = "compose"

    @property
    def project(self) -> str:
        return fold_name(
            f"{self.spec.deployment_id}-{self.spec.name}", max_len=63, allowed="a-z0-9_-"
        )

    @property
    def compose_path(self) -> Path:
        return self.paths.working_dir / "compose.yaml"

    def _prepare(self) -> None:
        if "compose" in self.props:
            content = self.props["compose"].encode()
        elif "composeFile" in self.props:
            name = self.props["composeFile"]
            source = self.paths.files_dir / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                raise _ToolError(
                    "bad-properties", f"composeFile {name!r} is not a plain name", retry=False
                )
            try:
                content = source.read_bytes()
            except OSError as exc:
                raise _ToolError(
                    "bad-properties", f"composeFile {name!r}: {exc.strerror}", retry=False
                ) from exc
        else:
            raise _ToolError(
                "bad-properties",
                "a compose component needs 'compose' (inline) or 'composeFile' (a deployment "
                "file); fetching packages from 'repository' is not supported",
                retry=False,
            )
        try:
            self.paths.working_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.compose_path, content)
        except OSError as exc:
            raise _ToolError("file-write-failed", f"cannot write compose file: {exc}") from exc

    def _environment(self) -> dict[str, str]:
        env = super()._environment()
        env.update(self.spec.env)
        return env

    def _base(self) -> list[str]:
        return ["docker", "compose", "-p", self.project, "-f", str(self.compose_path)]

    def _up_command(self) -> list[str]:
        return [*self._base(), "up", "-d", "--remove-orphans"]

    def _down_command(self) -> list[str]:
        return [*self._base(), "down", "--remove-orphans"]


class HelmRunner(ExternalRunner):
    """``helm.v3`` component. Properties: ``repository`` (chart reference, required),
    ``revision`` (chart version), ``namespace`` (default ``default``), ``timeout``,
    ``wait`` (default true). ``env`` pairs are passed as ``--set-string name=value``."""

    tool = "helm"
    source = "helm"

    @property
    def release(self) -> str:
        return fold_name(f"{self.spec.deployment_id}-{self.spec.name}", max_len=53)

    @property
    def namespace(self) -> str:
        return self.props.get("namespace", "default")

    def _prepare(self) -> None:
        if not self.props.get("repository"):
            raise _ToolError("bad-properties", "a helm component needs 'repository'", retry=False)
        self.paths.working_dir.mkdir(parents=True, exist_ok=True)

    def _up_command(self) -> list[str]:
        p = self.props
        argv = ["helm", "upgrade", "--install", self.release, p["repository"]]
        if p.get("revision"):
            argv += ["--version", p["revision"]]
        argv += ["--namespace", self.namespace, "--create-namespace"]
        if p.get("wait", "true").lower() not in ("false", "0", "no"):
            argv.append("--wait")
        if p.get("timeout"):
            argv += ["--timeout", p["timeout"]]
        for name, value in self.spec.env:
            argv += ["--set-string", f"{name}={value}"]
        return argv

    def _down_command(self) -> list[str]:
        return ["helm", "uninstall", self.release, "--namespace", self.namespace]

    def _up_timeout(self) -> float:
        # helm's own --timeout (default 5m) plus a margin for pulling the chart
        return (parse_duration(self.props.get("timeout", "")) or 300.0) + 120.0


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration such as ``8m30s`` or ``1h``; 0.0 if unparsable."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return 0.0
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


class ExternalRuntime(Runtime):
    runner_class: type[ExternalRunner] = ExternalRunner

    def __init__(
        self,
        *,
        search_path: str | None = None,
        backoff_initial: float = 2.0,
        backoff_max: float = 60.0,
    ) -> None:
        self.search_path = search_path
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max

    def create(
        self, spec: ComponentSpec, paths: ComponentPaths, on_change: StatusSink
    ) -> ExternalRunner:
        return self.runner_class(self, spec, paths, on_change)


class ComposeRuntime(ExternalRuntime):
    profile = ProfileType.COMPOSE
    runner_class = ComposeRunner


class HelmRuntime(ExternalRuntime):
    profile = ProfileType.HELM
    runner_class = HelmRunner
