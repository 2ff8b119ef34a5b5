"""WebAssembly components (profile type ``wasm``): WASI modules run on wasmtime.

Theory of operation
-------------------
Each run of a component is one worker process, ``python -P -m agent.runtime.wasm_worker``
(:mod:`agent.runtime.wasm_worker`), started like a ``process`` component: in its own session,
as the workload user (``--workload-user``), in the component's working directory
``STATE/work/<deployment>/<component>/`` (prepared by ``agent.runtime.workdirs`` as for
process), with its stdout and stderr, the guest's, copied into
``STATE/work/<deployment>/<component>.log``. The worker preopens that directory as the guest's
``/``, gives it the component's arguments (``argv[0]`` is the module's name) and environment
(``env`` plus ``ENV.<NAME>`` parameters; nothing of the agent's), applies the memory limit and
the fuel, runs ``_start`` and reports how the run ended as JSON on a pipe of its own.

Why a process and not a thread: a guest runs for as long as it likes and wasmtime's Python
binding holds no handle to interrupt it from outside except epoch interruption, which a guest
blocked in a host call (a WASI ``poll_oneoff`` sleep) never sees. Killing a process stops it at
once, whatever it is doing; a crash or an abort inside wasmtime takes the worker down, not the
agent; the guest runs as the workload user, not as the agent (often root); its memory is
returned to the system when it ends. The cost is a Python start-up and a compilation per run
(about 0.15 s and 30 MB for a small module).

The ``timeout`` (wall time) is enforced here: the worker is killed when it passes. Stopping the
component (deployment deleted or changed, agent shutting down) SIGKILLs the worker's process
group: a guest has nothing to flush that a signal could let it flush.

States reported, as for ``process``: ``installing`` while the worker starts; ``installed``
while it runs and, for ``restart: never``/``on-failure``, after the guest exited 0 (a job that
completed); ``failed`` otherwise, with an error whose ``source`` is ``wasm`` and whose
``code`` says why: ``exit-<n>`` (the guest's exit status), ``trap`` (the trap message and
where), ``fuel-limit``, ``memory-limit``, ``time-limit`` (each naming the limit),
``module-invalid`` (cannot compile, link or find ``_start``), ``worker-died`` (the worker was
killed or crashed), ``crash-loop`` after ``crash_loop_after`` failures in a row. Restarts follow
``restart`` with an exponential backoff; a failed component reads ``installed`` again once a
restarted run has stayed up for ``healthy_after`` seconds.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from typing import Any

import anyio

from agent.users import popen_args
from margo_stream.state.spec import ComponentSpec, ProfileType, RestartPolicy
from margo_stream.state.status import DeploymentState, StatusError
from margo_stream.state.wasm_spec import WasmLimits

from . import workdirs
from .base import ComponentPaths, StatusSink
from .process import ProcessPhase, ProcessRunner, ProcessRuntime, describe_exit
from .spawn import Child, PipeReader
from .wasm_worker import LAUNCH_ENV

SOURCE = "wasm"
WORKER_MODULE = "agent.runtime.wasm_worker"
_MAX_RESULT = 64 * 1024


@functools.cache
def wasmtime_available() -> bool:
    """True if the wasmtime package is installed for this interpreter (the agent then runs and
    reports ``wasm``). Only looked up: the agent never loads wasmtime, its workers do."""
    try:
        return importlib.util.find_spec("wasmtime") is not None
    except (ImportError, ValueError):
        return False


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


class LaunchError(Exception):
    """A run could not be started; ``code`` is the status error's."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WasmRuntime(ProcessRuntime):
    """Runs ``wasm`` components, one worker process per run, as ``run_as`` (``None``: as the
    agent), with the process runtime's restart settings. ``python`` is the interpreter the
    workers run on (the agent's own by default)."""

    profile = ProfileType.WASM

    def __init__(self, *, python: str = sys.executable, **settings: Any) -> None:
        super().__init__(**settings)
        self.python = python
        # a source-tree agent finds its modules through PYTHONPATH; only absolute entries, or
        # the guest's own directory (the worker's cwd) could supply them
        path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.path.isabs(p)]
        if path:
            self.base_env["PYTHONPATH"] = os.pathsep.join(path)

    def create(
        self, spec: ComponentSpec, paths: ComponentPaths, on_change: StatusSink
    ) -> WasmRunner:
        return WasmRunner(self, spec, paths, on_change)


class _Run:
    """One worker process: the child, its result pipe, and what came out of it."""

    def __init__(self, child: Child, results: PipeReader) -> None:
        self.child = child
        self.results = results
        self.result: dict[str, Any] | None = None
        self.timed_out = False


class WasmRunner(ProcessRunner):
    """Supervises one wasm component: a process runner (its log, output tail, backoff,
    recovery timer and kill-on-cancel are the process runner's) whose runs are wasm workers
    and whose failures are judged from the worker's result."""

    def __init__(
        self,
        runtime: WasmRuntime,
        spec: ComponentSpec,
        paths: ComponentPaths,
        on_change: StatusSink,
    ) -> None:
        super().__init__(runtime, spec, paths, on_change)
        self._wasm = runtime
        self._results: PipeReader | None = None  # the running worker's result pipe
        self.last_result: dict[str, Any] | None = None

    async def _supervise(self) -> None:
        rt = self._rt
        policy = self.spec.restart
        backoff = rt.backoff_initial
        crashes = 0
        while not self._stop_requested.is_set():
            self.phase = ProcessPhase.STARTING
            if self._status.state is not DeploymentState.FAILED:
                self._set(DeploymentState.INSTALLING)
            started = anyio.current_time()
            try:
                error = await self._run_once()
            except LaunchError as exc:
                self._log.note(exc.message)
                error = StatusError(exc.code, SOURCE, exc.message)
            if self._stop_requested.is_set():
                return
            if anyio.current_time() - started >= rt.reset_after:
                backoff, crashes = rt.backoff_initial, 0
            if error is None and policy is not RestartPolicy.ALWAYS:
                self._set(DeploymentState.INSTALLED)  # a job that completed
                break
            crashes += 1
            if crashes >= rt.crash_loop_after:
                last = error.message if error is not None else "exited with status 0"
                message = f"failed {crashes} times in a row (last: {last})"
                self._set(DeploymentState.FAILED, StatusError("crash-loop", SOURCE, message))
            elif error is not None:
                self._set(DeploymentState.FAILED, error)
            if policy is RestartPolicy.NEVER:
                break
            await self._pause(backoff)
            backoff = min(backoff * 2, rt.backoff_max)
        self.phase = ProcessPhase.DONE
        await self._stop_requested.wait()

    async def _run_once(self) -> StatusError | None:
        """Start a worker, wait for it, and judge the run: None if the guest exited 0."""
        limits = self._limits()
        run = await self._start_worker(limits)
        await self._await_worker(run, limits)
        return None if self._stop_requested.is_set() else self._judge(run, limits)

    def _limits(self) -> WasmLimits:
        try:
            return WasmLimits.from_properties(dict(self.spec.properties))
        except ValueError as exc:
            raise LaunchError("module-invalid", str(exc)) from exc

    def _launch(self, limits: WasmLimits, result_fd: int) -> dict[str, Any]:
        module, *args = self.spec.command
        return {
            "module": str(self.paths.files_dir / module),
            "name": module.rsplit("/", 1)[-1],
            "dir": str(self.paths.working_dir),
            "args": args,
            "env": dict(self.spec.env),
            "memory": limits.memory,
            "fuel": limits.fuel,
            "result_fd": result_fd,
        }

    async def _start_worker(self, limits: WasmLimits) -> _Run:
        if not self.spec.command:
            raise LaunchError("module-invalid", "the component names no module")
        cwd = self.paths.working_dir
        try:
            workdirs.prepare(self.paths, self.spec, self._rt.run_as)
        except OSError as exc:
            raise LaunchError(
                "working-dir", f"cannot prepare working directory {cwd}: {exc.strerror or exc}"
            ) from exc
        argv = [self._wasm.python, "-P", "-m", WORKER_MODULE]
        read_fd, write_fd = os.pipe()
        try:
            env = dict(self._rt.base_env)
            env[LAUNCH_ENV] = json.dumps(self._launch(limits, write_fd))
            popen = subprocess.Popen(  # noqa: S603 - our own worker, the module is signed
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
                pass_fds=(write_fd,),
                **popen_args(self._rt.run_as),
            )
        except OSError as exc:
            os.close(read_fd)
            raise LaunchError(
                "worker-died", f"cannot start the wasm worker {argv[0]}: {exc.strerror or exc}"
            ) from exc
        finally:
            os.close(write_fd)
        run = _Run(Child(popen), PipeReader(read_fd))
        self._proc, self._results = run.child, run.results
        self._tail = b""
        self.runs += 1
        self.phase = ProcessPhase.RUNNING
        self._log.note(f"started pid {popen.pid}: wasm module {self.spec.command[0]}")
        if self._status.state is not DeploymentState.FAILED:
            self._set(DeploymentState.INSTALLED)
        return run

    async def _await_worker(self, run: _Run, limits: WasmLimits) -> None:
        """Wait for the worker to exit (killing it at a stop or past the timeout) and for its
        output and result to be read."""
        child = run.child
        pumped, reported = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            assert child.stdout is not None
            tg.start_soon(self._pump, child.stdout, pumped)
            tg.start_soon(self._read_result, run, reported)
            tg.start_soon(self._kill_on_stop, child.pid)
            if self._status.state is DeploymentState.FAILED:
                tg.start_soon(self._recover_after, self._rt.healthy_after)
            with anyio.move_on_after(limits.timeout or math.inf):
                await child.wait()
            if child.returncode is None:
                run.timed_out = True
                self._signal_group(child.pid, signal.SIGKILL)
                await child.wait()
            self._signal_group(child.pid, signal.SIGKILL)  # strays left in the group
            with anyio.move_on_after(2.0):
                await pumped.wait()
                await reported.wait()
            tg.cancel_scope.cancel()
        await child.aclose()
        await run.results.aclose()
        self._proc = self._results = None
        self.last_returncode = child.returncode
        self.last_result = run.result
        assert child.returncode is not None
        self._log.note(f"pid {child.pid} {describe_exit(child.returncode)}")

    def _judge(self, run: _Run, limits: WasmLimits) -> StatusError | None:
        """The error a finished run reports (None: the guest exited 0); noted in the log."""
        result = run.result or {}
        kind, message = result.get("kind"), str(result.get("message", ""))
        if run.timed_out:
            assert limits.timeout is not None
            error = StatusError(
                "time-limit",
                SOURCE,
                f"exceeded its wall-time limit (timeout) of {limits.timeout:g} s and was stopped",
            )
        elif kind == "exit" and result.get("code") == 0:
            return None
        elif kind == "exit":
            tail = self.last_log_line
            suffix = f"; last log line: {tail!r}" if tail else ""
            code = result.get("code")
            error = StatusError(f"exit-{code}", SOURCE, f"exited with status {code}{suffix}")
        elif kind == "trap":
            error = StatusError("trap", SOURCE, f"trapped: {message}")
        elif kind == "fuel":
            error = StatusError(
                "fuel-limit", SOURCE, f"ran out of fuel (fuel limit {limits.fuel}): {message}"
            )
        elif kind == "memory":
            error = StatusError(
                "memory-limit",
                SOURCE,
                f"reached its memory limit (memoryLimit {_size(limits.memory)}): {message}",
            )
        elif kind == "invalid":
            error = StatusError("module-invalid", SOURCE, message)
        else:
            returncode = run.child.returncode
            what = describe_exit(returncode) if returncode is not None else "vanished"
            tail = self.last_log_line
            suffix = f"; last log line: {tail!r}" if tail else ""
            error = StatusError("worker-died", SOURCE, f"the wasm worker {what}{suffix}")
        self._log.note(f"{error.code}: {error.message}")
        return error

    async def _read_result(self, run: _Run, done: anyio.Event) -> None:
        data = b""
        try:
            async for chunk in run.results:
                data += chunk
                if len(data) > _MAX_RESULT:
                    break
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            try:
                parsed = json.loads(data) if data else None
            except ValueError:
                parsed = None
            run.result = parsed if isinstance(parsed, dict) else None
            done.set()

    async def _kill_on_stop(self, pgid: int) -> None:
        await self._stop_requested.wait()
        self._signal_group(pgid, signal.SIGKILL)  # a guest has nothing to flush

    async def _kill_now(self) -> None:
        """Cancellation path: the process runner's (SIGKILL the group, reap), and the pipe."""
        await super()._kill_now()
        if self._results is not None:
            await self._results.aclose()
            self._results = None
