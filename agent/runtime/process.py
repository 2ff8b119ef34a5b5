"""Supervised local processes (profile type ``process``).

Theory of operation
-------------------
A :class:`ProcessRunner` loops: spawn the command in its own session (so it leads its own
process group), copy its stdout+stderr into a size-bounded log file, wait for it to exit, and
decide from the restart policy whether to spawn it again after an exponential backoff.

States it reports:

* ``installing`` while the first spawn is under way;
* ``installed`` while the process runs (and, for ``restart=never``/``on-failure``, after a clean
  exit 0: the job completed);
* ``failed`` after a non-zero exit, a death by signal or a command that cannot be executed.
  A failed component keeps being restarted per policy; it reads ``installed`` again once a
  restarted process has stayed up for ``healthy_after`` seconds. ``crash_loop_after`` crashes
  in a row (each with less than ``reset_after`` seconds of uptime) turn the error code from
  ``exit-<n>`` into ``crash-loop``.

Stopping sends SIGTERM to the whole process group, SIGKILL after ``stop_grace`` seconds, and
waits for the process. Whatever is left of the group once the leader exited is killed too, so
a component never leaves strays behind. If the supervising task is cancelled, the group is
killed at once (shielded) before the task returns.
"""

from __future__ import annotations

import enum
import logging
import os
import shlex
import signal
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream, TaskStatus

from agent.users import RunAs
from margo_stream.state.spec import ComponentSpec, ProfileType, RestartPolicy
from margo_stream.state.status import ComponentStatus, DeploymentState, StatusError

from . import workdirs
from .base import ComponentPaths, ComponentRunner, Runtime, StatusSink
from .spawn import Child, spawn

log = logging.getLogger(__name__)

SOURCE = "process"
BASE_ENV_KEYS = ("PATH", "HOME", "LANG")
_TAIL_BYTES = 4096
_MAX_LINE = 300


class ProcessPhase(enum.StrEnum):
    """Where a runner is in its supervision loop (for tests and diagnostics)."""

    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    DONE = "done"  # exited and will not be restarted by policy
    STOPPED = "stopped"


class _LaunchError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProcessRuntime(Runtime):
    """Runs ``process`` components as supervised child processes, as ``run_as`` (``None``: as
    the agent; see ``agent.runtime.workdirs`` for the directories another user is given)."""

    profile = ProfileType.PROCESS

    def __init__(
        self,
        *,
        stop_grace: float = 5.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        reset_after: float = 60.0,
        healthy_after: float = 10.0,
        crash_loop_after: int = 3,
        log_max_bytes: int = 1 << 20,
        base_env: dict[str, str] | None = None,
        run_as: RunAs | None = None,
    ) -> None:
        self.run_as = run_as
        self.stop_grace = stop_grace
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.reset_after = reset_after
        self.healthy_after = healthy_after
        self.crash_loop_after = crash_loop_after
        self.log_max_bytes = log_max_bytes
        if base_env is None:
            base_env = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
        self.base_env = dict(base_env)

    def create(
        self, spec: ComponentSpec, paths: ComponentPaths, on_change: StatusSink
    ) -> ProcessRunner:
        return ProcessRunner(self, spec, paths, on_change)


class _Log:
    """Appends to ``path``, rotating to ``path.1`` when it would grow past ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int, owner: RunAs | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.owner = owner if owner is not None and owner.switches else None
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
            self._fd = os.open(self.path, flags, 0o640)
            if self.owner is not None:  # the workload's own log, readable by it
                os.fchown(self._fd, self.owner.uid, self.owner.gid)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def write(self, data: bytes) -> None:
        if len(data) > self.max_bytes:  # keep the newest output of an oversized burst
            data = data[-self.max_bytes :]
        try:
            fd = self._open()
            if self._size and self._size + len(data) > self.max_bytes:
                self.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                fd = self._open()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._size += len(data)
        except OSError as exc:  # a full disk must not take the supervisor down
            log.warning("cannot write %s: %s", self.path, exc)

    def note(self, text: str) -> None:
        self.write(f"[margo-agent] {text}\n".encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} ({-returncode})"
    return f"exited with status {returncode}"


def exit_code(returncode: int) -> int:
    """Shell convention: death by signal N reads as exit status 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class ProcessRunner(ComponentRunner):
    """Supervises one process component."""

    def __init__(
        self,
        runtime: ProcessRuntime,
        spec: ComponentSpec,
        paths: ComponentPaths,
        on_change: StatusSink,
    ) -> None:
        super().__init__(spec, paths, on_change)
        self._rt = runtime
        self._proc: Child | None = None
        self._log = _Log(paths.log_path, runtime.log_max_bytes, runtime.run_as)
        self._tail = b""
        self._wake = anyio.Event()
        self.phase = ProcessPhase.STARTING
        self.runs = 0  # how many times the command was spawned
        self.last_returncode: int | None = None

    # -- observation -----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """PID of the running process, None when none runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def pgid(self) -> int | None:
        """Process group of the running process (equal to its PID: it leads its own session)."""
        return self.pid

    @property
    def last_log_line(self) -> str:
        for raw in reversed(self._tail.splitlines()):
            line = raw.decode("utf-8", "replace").strip()
            if line:
                return line[:_MAX_LINE]
        return ""

    # -- supervision -----------------------------------------------------------------------
    def _on_stop_requested(self) -> None:
        self._wake.set()

    def _set(self, state: DeploymentState, error: StatusError | None = None) -> None:
        self._set_status(ComponentStatus(name=self.spec.name, state=state, error=error))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._supervise()
        finally:
            with anyio.CancelScope(shield=True):
                await self._kill_now()
            self._log.close()
            self.phase = ProcessPhase.STOPPED
            self._finished.set()

    async def _supervise(self) -> None:
        rt = self._rt
        policy = self.spec.restart
        backoff = rt.backoff_initial
        crashes = 0
        while not self._stop_requested.is_set():
            self.phase = ProcessPhase.STARTING
            if self._status.state is not DeploymentState.FAILED:
                self._set(DeploymentState.INSTALLING)
            try:
                proc = await self._spawn()
            except _LaunchError as exc:
                self._log.note(exc.message)
                self._set(DeploymentState.FAILED, StatusError(exc.code, SOURCE, exc.message))
                if policy is RestartPolicy.NEVER:
                    break
                await self._pause(backoff)
                backoff = min(backoff * 2, rt.backoff_max)
                continue

            started = anyio.current_time()
            returncode = await self._watch(proc)
            if self._stop_requested.is_set():
                return
            uptime = anyio.current_time() - started
            if uptime >= rt.reset_after:
                backoff, crashes = rt.backoff_initial, 0
            clean = returncode == 0
            if clean and policy is not RestartPolicy.ALWAYS:
                self._set(DeploymentState.INSTALLED)  # a job that completed
                break
            crashes += 1
            what = describe_exit(returncode)
            tail = self.last_log_line
            suffix = f"; last log line: {tail!r}" if tail else ""
            if crashes >= rt.crash_loop_after:
                message = f"crashed {crashes} times in a row (last: {what}){suffix}"
                self._set(DeploymentState.FAILED, StatusError("crash-loop", SOURCE, message))
            elif not clean:
                error = StatusError(f"exit-{exit_code(returncode)}", SOURCE, f"{what}{suffix}")
                self._set(DeploymentState.FAILED, error)
            if policy is RestartPolicy.NEVER:
                break
            await self._pause(backoff)
            backoff = min(backoff * 2, rt.backoff_max)
        self.phase = ProcessPhase.DONE
        await self._stop_requested.wait()

    async def _pause(self, delay: float) -> None:
        """Backoff before a restart; returns early when a stop is requested."""
        self.phase = ProcessPhase.BACKOFF
        with anyio.move_on_after(delay):
            await self._stop_requested.wait()

    def _environment(self) -> dict[str, str]:
        env = dict(self._rt.base_env)
        run_as = self._rt.run_as
        if run_as is not None and run_as.switches:
            env.update(HOME=run_as.home, USER=run_as.name, LOGNAME=run_as.name)
        env["MARGO_DEPLOYMENT_ID"] = self.spec.deployment_id
        env["MARGO_COMPONENT"] = self.spec.name
        env["MARGO_FILES_DIR"] = str(self.paths.files_dir)
        env.update(self.spec.env)
        return env

    async def _spawn(self) -> Child:
        argv = list(self.spec.command)
        if not argv:
            raise _LaunchError("no-command", "the component has no command to run")
        cwd = self.paths.working_dir
        # The agent's own directories (default or relative to the deployment's) are created;
        # an absolute working_dir belongs to the device and must exist.
        if self.spec.working_dir is not None and Path(self.spec.working_dir).is_absolute():
            if not cwd.is_dir():
                raise _LaunchError("working-dir", f"working directory {cwd} does not exist")
        try:
            workdirs.prepare(self.paths, self.spec, self._rt.run_as)
        except OSError as exc:
            raise _LaunchError(
                "working-dir", f"cannot prepare working directory {cwd}: {exc.strerror or exc}"
            ) from exc
        exe = argv[0]
        try:
            proc = await spawn(argv, cwd=cwd, env=self._environment(), run_as=self._rt.run_as)
        except FileNotFoundError as exc:
            where = "" if "/" in exe else " on PATH"
            raise _LaunchError(
                "command-not-found", f"cannot run {exe!r}: not found{where}"
            ) from exc
        except PermissionError as exc:
            raise _LaunchError(
                "command-not-executable", f"cannot run {exe!r}: permission denied (not executable?)"
            ) from exc
        except OSError as exc:
            raise _LaunchError("exec-failed", f"cannot run {exe!r}: {exc.strerror or exc}") from exc
        self._proc = proc
        self._tail = b""
        self.runs += 1
        self.phase = ProcessPhase.RUNNING
        self._log.note(f"started pid {proc.pid}: {shlex.join(argv)}")
        if self._status.state is not DeploymentState.FAILED:
            self._set(DeploymentState.INSTALLED)
        return proc

    async def _watch(self, proc: Child) -> int:
        """Wait for ``proc`` to exit (terminating it if a stop is requested); its return code."""
        pumped = anyio.Event()
        async with anyio.create_task_group() as tg:
            assert proc.stdout is not None
            tg.start_soon(self._pump, proc.stdout, pumped)
            tg.start_soon(self._terminate_on_stop, proc)
            if self._status.state is DeploymentState.FAILED:
                tg.start_soon(self._recover_after, self._rt.healthy_after)
            returncode = await proc.wait()
            self._signal_group(proc.pid, signal.SIGKILL)  # strays left in the group
            with anyio.move_on_after(2.0):
                await pumped.wait()
            tg.cancel_scope.cancel()
        await proc.aclose()
        self._proc = None
        self.last_returncode = returncode
        self._log.note(f"pid {proc.pid} {describe_exit(returncode)}")
        return returncode

    async def _pump(self, stream: ByteReceiveStream, done: anyio.Event) -> None:
        try:
            async for chunk in stream:
                self._log.write(chunk)
                self._tail = (self._tail + chunk)[-_TAIL_BYTES:]
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            done.set()

    async def _terminate_on_stop(self, proc: Child) -> None:
        await self._stop_requested.wait()
        self._signal_group(proc.pid, signal.SIGTERM)
        await anyio.sleep(self._rt.stop_grace)  # grace timer; cancelled once the process exits
        self._log.note(f"pid {proc.pid} ignored SIGTERM for {self._rt.stop_grace} s: SIGKILL")
        self._signal_group(proc.pid, signal.SIGKILL)

    async def _recover_after(self, delay: float) -> None:
        await anyio.sleep(delay)  # uptime timer; cancelled if the process exits first
        self._set(DeploymentState.INSTALLED)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def _kill_now(self) -> None:
        """Cancellation path: SIGKILL the group and reap the process."""
        proc = self._proc
        if proc is None:
            return
        self._signal_group(proc.pid, signal.SIGKILL)
        with anyio.move_on_after(5.0):
            await proc.wait()
        self._proc = None
        try:
            await proc.aclose()
        except Exception:  # streams may already be closed
            pass
