"""The reconciler driving real processes (and the compose/helm runtimes without their tools).

Processes are this interpreter running small scripts, in a temporary state directory. Tests wait
on status events or on files the processes write, always under ``anyio.fail_after``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from agent.reconciler import Reconciler
from agent.runtime.defaults import default_runtimes
from agent.runtime.process import ProcessPhase, ProcessRunner, ProcessRuntime
from margo_stream.state.spec import (
    ComponentSpec,
    DeploymentSpec,
    FileSpec,
    ProfileType,
    RestartPolicy,
)
from margo_stream.state.status import DeploymentState, DeploymentStatus
from tests.harness import pid_alive

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TIMEOUT = 10.0
INSTALLED, FAILED = DeploymentState.INSTALLED, DeploymentState.FAILED


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- helpers -----------------------------------------------------------------------------------


class Recorder:
    """The ``on_status`` callback: keeps every status and wakes waiters."""

    def __init__(self) -> None:
        self.statuses: list[DeploymentStatus] = []
        self._changed = anyio.Event()

    async def __call__(self, status: DeploymentStatus) -> None:
        self.statuses.append(status)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(
        self, pred: Callable[[DeploymentStatus], bool], *, after: int = 0
    ) -> DeploymentStatus:
        """The first status at index >= ``after`` matching ``pred`` (waiting for it)."""
        i = after
        with anyio.fail_after(TIMEOUT):
            while True:
                while i < len(self.statuses):
                    status = self.statuses[i]
                    i += 1
                    if pred(status):
                        return status
                await self._changed.wait()

    def states(self, dep_id: str) -> list[DeploymentState]:
        return [s.state for s in self.statuses if s.deployment_id == dep_id]


class Blobs(dict[str, bytes]):
    def add(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self[digest] = data
        return digest


async def wait_until(pred: Callable[[], object], what: str) -> None:
    """Poll a condition on files or /proc (nothing to subscribe to there), with a deadline."""
    try:
        with anyio.fail_after(TIMEOUT):
            while not pred():
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def running(rc: Reconciler, dep: str, name: str) -> tuple[ProcessRunner, int]:
    """The component's runner once it has a running process (the process may have written its
    files before the supervisor learnt its pid), and that pid."""

    def ready() -> bool:
        runner = rc.runner(dep, name)
        return isinstance(runner, ProcessRunner) and runner.pid is not None

    await wait_until(ready, f"{dep}/{name} to run")
    runner = rc.runner(dep, name)
    assert isinstance(runner, ProcessRunner) and runner.pid is not None
    return runner, runner.pid


def read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def group_alive(pgid: int) -> bool:
    """True if a live (non-zombie) process is in process group ``pgid``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def component(dep: str, name: str, command: tuple[str, ...], **kw: object) -> ComponentSpec:
    return ComponentSpec(
        deployment_id=dep, name=name, profile=ProfileType.PROCESS, command=command, **kw
    )  # type: ignore[arg-type]


def deployment(dep: str, *comps: ComponentSpec, files: tuple[FileSpec, ...] = ()) -> DeploymentSpec:
    return DeploymentSpec(
        deployment_id=dep,
        digest="sha256:" + "0" * 64,
        name=dep,
        profile=comps[0].profile if comps else ProfileType.PROCESS,
        components=comps,
        files=files,
    )


def fast_runtimes(**kw: object) -> dict:
    options: dict = {
        "stop_grace": 2.0,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "healthy_after": 30.0,
    }
    options.update(kw)
    return {ProfileType.PROCESS: ProcessRuntime(**options)}


def component_of(status: DeploymentStatus, name: str):
    return next(c for c in status.components if c.name == name)


# A service: writes "$GREETING|<content of the deployment file>" to $OUT, prints, sleeps.
SERVICE = py(
    "import os, time\n"
    "msg = open(os.path.join(os.environ['MARGO_FILES_DIR'], 'conf/msg.txt')).read()\n"
    "out = os.environ['OUT']\n"
    "open(out + '.tmp', 'w').write(os.environ['GREETING'] + '|' + msg)\n"
    "os.replace(out + '.tmp', out)\n"
    "print('serving', os.getcwd(), flush=True)\n"
    "time.sleep(600)\n"
)


# -- tests -------------------------------------------------------------------------------------


async def test_start_change_and_remove(tmp_path: Path) -> None:
    state, out = tmp_path / "state", tmp_path / "out.txt"
    blobs, rec = Blobs(), Recorder()
    v1 = blobs.add(b"v1")

    def spec(greeting: str, file_digest: str) -> DeploymentSpec:
        env = (("GREETING", greeting), ("OUT", str(out)))
        web = component("dep-1", "web", SERVICE, env=env)
        return deployment("dep-1", web, files=(FileSpec("conf/msg.txt", file_digest),))

    async with Reconciler(state, blobs.__getitem__, rec, runtimes=fast_runtimes()) as reconciler:
        await reconciler.apply(1, [spec("hello", v1)])
        await wait_until(lambda: read(out) == "hello|v1", "the first output")
        first = await rec.wait_for(lambda s: s.state is INSTALLED)
        assert first.manifest_version == 1 and first.error is None
        assert rec.states("dep-1")[:3] == [
            DeploymentState.PENDING,
            DeploymentState.INSTALLING,
            DeploymentState.INSTALLED,
        ]
        runner, pid1 = await running(reconciler, "dep-1", "web")
        assert runner.pgid == pid1 and os.getpgid(pid1) == pid1
        assert os.getsid(pid1) == pid1  # its own session
        work = state / "work" / "dep-1"
        assert (work / "files" / "conf" / "msg.txt").read_bytes() == b"v1"
        log = work / "web.log"
        await wait_until(lambda: "serving " + str(work / "web") in read(log), "the log line")

        # A changed parameter restarts the component with the new value.
        mark = len(rec.statuses)
        await reconciler.apply(2, [spec("bye", v1)])
        await wait_until(lambda: read(out) == "bye|v1", "the restarted output")
        second = await rec.wait_for(lambda s: s.state is INSTALLED, after=mark)
        assert second.manifest_version == 2
        runner2, pid2 = await running(reconciler, "dep-1", "web")
        assert runner2 is not runner and pid2 != pid1
        assert not group_alive(pid1)

        # The same desired state again changes nothing and reports nothing.
        await reconciler.flush()
        mark = len(rec.statuses)
        await reconciler.apply(2, [spec("bye", v1)])
        await reconciler.flush()
        assert len(rec.statuses) == mark
        assert reconciler.runner("dep-1", "web") is runner2 and runner2.pid == pid2

        # A changed file restarts it too.
        v2 = blobs.add(b"v2")
        await reconciler.apply(3, [spec("bye", v2)])
        await wait_until(lambda: read(out) == "bye|v2", "the output with the new file")
        runner3, pid3 = await running(reconciler, "dep-1", "web")
        assert runner3 is not runner2 and pid3 != pid2

        # Absent from the desired state: removed, process group gone.
        mark = len(rec.statuses)
        await reconciler.apply(4, [])
        removed = await rec.wait_for(lambda s: s.state is DeploymentState.REMOVED, after=mark)
        assert [s.state for s in rec.statuses[mark:]] == [
            DeploymentState.REMOVING,
            DeploymentState.REMOVED,
        ]
        assert removed.manifest_version == 4
        assert [c.state for c in removed.components] == [DeploymentState.REMOVED]
        assert not group_alive(pid3)
        assert not work.exists()
        assert reconciler.runner("dep-1", "web") is None
        assert reconciler.running() == {}
        assert reconciler.current_statuses()["dep-1"] == removed


async def test_on_failure_restarts_and_reports_the_exit(tmp_path: Path) -> None:
    runs, rec = tmp_path / "runs", Recorder()
    crash = py(
        f"open({str(runs)!r}, 'a').write('x')\nprint('first line')\nprint('boom: no config')\n"
        "raise SystemExit(1)"
    )
    spec = deployment("crashy", component("crashy", "c", crash, restart=RestartPolicy.ON_FAILURE))
    async with Reconciler(tmp_path / "s", {}.__getitem__, rec, runtimes=fast_runtimes()) as rc:
        await rc.apply(7, [spec])
        failed = await rec.wait_for(lambda s: s.state is FAILED)
        assert failed.error is not None and failed.error.code == "exit-1"
        assert failed.error.source == "process"
        assert "exited with status 1" in failed.error.message
        assert "boom: no config" in failed.error.message
        assert component_of(failed, "c").error == failed.error
        loop = await rec.wait_for(lambda s: s.error is not None and s.error.code == "crash-loop")
        assert loop.state is FAILED and "status 1" in loop.error.message  # type: ignore[union-attr]
        assert len(read(runs)) >= 3
        runner = rc.runner("crashy", "c")
        assert isinstance(runner, ProcessRunner) and runner.runs >= 3
        assert "boom: no config" in read(tmp_path / "s" / "work" / "crashy" / "c.log")


async def test_recovers_to_installed_after_staying_up(tmp_path: Path) -> None:
    marker, rec = tmp_path / "crashed-once", Recorder()
    flaky = py(
        "import os, sys, time\n"
        f"m = {str(marker)!r}\n"
        "if not os.path.exists(m):\n"
        "    open(m, 'w').close(); sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    spec = deployment("flaky", component("flaky", "c", flaky))
    runtimes = fast_runtimes(healthy_after=0.3)
    async with Reconciler(tmp_path / "s", {}.__getitem__, rec, runtimes=runtimes) as rc:
        await rc.apply(1, [spec])
        failed = await rec.wait_for(lambda s: s.state is FAILED)
        assert failed.error is not None and failed.error.code == "exit-3"
        mark = rec.statuses.index(failed) + 1
        healthy = await rec.wait_for(lambda s: s.state is INSTALLED, after=mark)
        assert healthy.error is None and component_of(healthy, "c").error is None


async def test_death_by_signal_is_reported(tmp_path: Path) -> None:
    rec = Recorder()
    suicide = py("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    spec = deployment("sig", component("sig", "c", suicide, restart=RestartPolicy.NEVER))
    async with Reconciler(tmp_path / "s", {}.__getitem__, rec, runtimes=fast_runtimes()) as rc:
        await rc.apply(1, [spec])
        failed = await rec.wait_for(lambda s: s.state is FAILED)
        assert failed.error is not None and failed.error.code == "exit-137"
        assert "SIGKILL" in failed.error.message


async def test_never_and_clean_exit_is_installed_and_not_restarted(tmp_path: Path) -> None:
    runs, rec = tmp_path / "runs", Recorder()
    job = py(f"open({str(runs)!r}, 'a').write('x')")
    spec = deployment("job", component("job", "once", job, restart=RestartPolicy.NEVER))
    async with Reconciler(tmp_path / "s", {}.__getitem__, rec, runtimes=fast_runtimes()) as rc:
        await rc.apply(1, [spec])
        runner = rc.runner("job", "once")
        assert isinstance(runner, ProcessRunner)
        await wait_until(lambda: runner.phase is ProcessPhase.DONE, "the job to finish")
        assert runner.last_returncode == 0 and runner.runs == 1 and runner.pid is None
        assert read(runs) == "x"
        await rc.flush()
        assert rc.current_statuses()["job"].state is INSTALLED
        assert FAILED not in rec.states("job")


async def test_command_that_cannot_run_fails_naming_it(tmp_path: Path) -> None:
    rec = Recorder()
    not_exec = tmp_path / "not-executable.sh"
    not_exec.write_text("#!/bin/sh\nexit 0\n")
    not_exec.chmod(0o644)
    spec = deployment(
        "bad",
        component("bad", "missing", ("margo-no-such-program", "--x"), restart=RestartPolicy.NEVER),
        component("bad", "noexec", (str(not_exec),), restart=RestartPolicy.NEVER),
    )
    async with Reconciler(tmp_path / "s", {}.__getitem__, rec, runtimes=fast_runtimes()) as rc:
        await rc.apply(1, [spec])
        status = await rec.wait_for(
            lambda s: all(c.state is FAILED for c in s.components) and len(s.components) == 2
        )
        assert status.state is FAILED
        missing, noexec = (component_of(status, n).error for n in ("missing", "noexec"))
        assert missing is not None and noexec is not None
        assert missing.code == "command-not-found"
        assert "'margo-no-such-program'" in missing.message and "not found" in missing.message
        assert noexec.code == "command-not-executable"
        assert str(not_exec) in noexec.message


async def test_compose_and_helm_without_their_tools(tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    rec = Recorder()
    runtimes = default_runtimes(search_path=str(empty_bin))
    compose = ComponentSpec(
        deployment_id="stack", name="app", profile=ProfileType.COMPOSE,
        properties=(("compose", "services: {}\n"),),
    )  # fmt: skip
    helm = ComponentSpec(
        deployment_id="chart", name="db", profile=ProfileType.HELM,
        properties=(("repository", "oci://registry.invalid/db"), ("revision", "1.2.3")),
    )  # fmt: skip
    async with Reconciler(tmp_path / "s", {}.__getitem__, rec, runtimes=runtimes) as rc:
        await rc.apply(1, [deployment("stack", compose), deployment("chart", helm)])
        stack = await rec.wait_for(lambda s: s.deployment_id == "stack" and s.state is FAILED)
        chart = await rec.wait_for(lambda s: s.deployment_id == "chart" and s.state is FAILED)
        assert stack.error is not None and chart.error is not None
        assert (stack.error.code, stack.error.source) == ("runtime-missing", "compose")
        assert stack.error.message == "'docker' not found on PATH: cannot run compose deployments"
        assert (chart.error.code, chart.error.source) == ("runtime-missing", "helm")
        assert chart.error.message == "'helm' not found on PATH: cannot run helm deployments"
        # Removing them works without the tools, too.
        await rc.apply(2, [])
        await rec.wait_for(lambda s: s.deployment_id == "chart" and s.state.value == "removed")
        await rec.wait_for(lambda s: s.deployment_id == "stack" and s.state.value == "removed")


def _stubborn(ready: Path, child_pid_file: Path) -> tuple[str, ...]:
    """Ignores SIGTERM and has a child in its process group; writes both when ready."""
    return py(
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(child_pid_file)!r}, 'w').write(str(child.pid))\n"
        f"open({str(ready)!r}, 'w').write('ready')\n"
        "time.sleep(600)\n"
    )


async def test_shutdown_kills_everything(tmp_path: Path) -> None:
    ready, child_pid, out, rec = (
        tmp_path / "ready",
        tmp_path / "child",
        tmp_path / "out",
        Recorder(),
    )
    blobs = Blobs()
    blobs.add(b"m")
    calm = component("svc", "calm", SERVICE, env=(("GREETING", "hi"), ("OUT", str(out))))
    stubborn = component("svc", "stubborn", _stubborn(ready, child_pid))
    spec = deployment("svc", calm, stubborn, files=(FileSpec("conf/msg.txt", next(iter(blobs))),))
    runtimes = fast_runtimes(stop_grace=0.5)
    async with Reconciler(tmp_path / "s", blobs.__getitem__, rec, runtimes=runtimes) as rc:
        await rc.apply(1, [spec])
        await wait_until(lambda: read(ready) == "ready" and read(out) == "hi|m", "both running")
        pgids = [(await running(rc, "svc", n))[1] for n in ("calm", "stubborn")]
        grandchild = int(read(child_pid))
        assert os.getpgid(grandchild) == pgids[1]
        started = anyio.current_time()
    # Leaving the context shut everything down: SIGTERM, then SIGKILL for the stubborn group.
    assert anyio.current_time() - started >= 0.5
    for pgid in pgids:
        assert not group_alive(pgid)
    assert not pid_alive(grandchild)


async def test_run_in_a_task_group_and_cancel(tmp_path: Path) -> None:
    out, rec, blobs = tmp_path / "out", Recorder(), Blobs()
    digest = blobs.add(b"x")
    svc = component("svc", "calm", SERVICE, env=(("GREETING", "g"), ("OUT", str(out))))
    spec = deployment("svc", svc, files=(FileSpec("conf/msg.txt", digest),))
    reconciler = Reconciler(tmp_path / "s", blobs.__getitem__, rec, runtimes=fast_runtimes())
    async with anyio.create_task_group() as tg:
        await tg.start(reconciler.run)
        await reconciler.apply(1, [spec])
        await wait_until(lambda: read(out) == "g|x", "the service")
        _, pgid = await running(reconciler, "svc", "calm")
        tg.cancel_scope.cancel()
    assert not group_alive(pgid)
    with pytest.raises(RuntimeError):
        await reconciler.apply(2, [])


async def test_missing_blob_fails_and_is_retried(tmp_path: Path) -> None:
    out, rec, blobs = tmp_path / "out", Recorder(), Blobs()
    data = b"late"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    svc = component("svc", "calm", SERVICE, env=(("GREETING", "g"), ("OUT", str(out))))
    spec = deployment("svc", svc, files=(FileSpec("conf/msg.txt", digest),))
    async with Reconciler(tmp_path / "s", blobs.__getitem__, rec, runtimes=fast_runtimes()) as rc:
        await rc.apply(1, [spec])
        failed = await rec.wait_for(lambda s: s.state is FAILED)
        assert failed.error is not None and failed.error.code == "blob-missing"
        assert rc.runner("svc", "calm") is None
        blobs[digest] = b"tampered"
        await rc.apply(2, [spec])
        bad = await rec.wait_for(lambda s: s.manifest_version == 2 and s.state is FAILED)
        assert bad.error is not None and bad.error.code == "blob-digest-mismatch"
        blobs[digest] = data
        await rc.apply(3, [spec])
        await wait_until(lambda: read(out) == "g|late", "the service")
        await rec.wait_for(lambda s: s.manifest_version == 3 and s.state is INSTALLED)


async def test_log_is_bounded(tmp_path: Path) -> None:
    rec = Recorder()
    chatty = py(
        "import sys\nfor i in range(200):\n    print('line %04d ' % i + 'x' * 90, flush=True)"
    )
    spec = deployment("log", component("log", "c", chatty, restart=RestartPolicy.NEVER))
    runtimes = fast_runtimes(log_max_bytes=2000)
    async with Reconciler(tmp_path / "s", {}.__getitem__, rec, runtimes=runtimes) as rc:
        await rc.apply(1, [spec])
        runner = rc.runner("log", "c")
        assert isinstance(runner, ProcessRunner)
        await wait_until(lambda: runner.phase is ProcessPhase.DONE, "the output")
        log = tmp_path / "s" / "work" / "log" / "c.log"
        rotated = log.with_name("c.log.1")
        assert rotated.exists()
        assert log.stat().st_size <= 2000 and rotated.stat().st_size <= 2000
        assert "line 0199" in rotated.read_text() + log.read_text()
        assert "line 0000" not in rotated.read_text() + log.read_text()


async def test_removed_component_stops_and_the_others_are_untouched(tmp_path: Path) -> None:
    rec, blobs = Recorder(), Blobs()
    digest = blobs.add(b"m")
    files = (FileSpec("conf/msg.txt", digest),)
    outs = {n: tmp_path / n for n in ("keep", "drop")}
    comps = {
        n: component("two", n, SERVICE, env=(("GREETING", n), ("OUT", str(outs[n]))),
                     working_dir="custom-" + n)
        for n in outs
    }  # fmt: skip
    async with Reconciler(tmp_path / "s", blobs.__getitem__, rec, runtimes=fast_runtimes()) as rc:
        await rc.apply(1, [deployment("two", comps["keep"], comps["drop"], files=files)])
        await wait_until(lambda: all(read(outs[n]) == f"{n}|m" for n in outs), "both running")
        keep, keep_pid = await running(rc, "two", "keep")
        _, drop_pid = await running(rc, "two", "drop")
        work = tmp_path / "s" / "work" / "two"
        await wait_until(
            lambda: f"serving {work / 'custom-keep'}" in read(work / "keep.log"), "log"
        )
        mark = len(rec.statuses)
        await rc.apply(2, [deployment("two", comps["keep"], files=files)])
        status = await rec.wait_for(lambda s: s.manifest_version == 2, after=mark)
        await rc.flush()
        status = rc.current_statuses()["two"]
        assert status.state is INSTALLED and [c.name for c in status.components] == ["keep"]
        assert not group_alive(drop_pid)
        assert rc.runner("two", "keep") is keep and keep.pid == keep_pid
        assert rc.runner("two", "drop") is None
        assert not (tmp_path / "s" / "work" / "two" / "drop.log").exists()


def _fake_tool(bin_dir: Path, name: str, calls: Path, *, fail_with: str = "") -> None:
    """A stand-in for docker/helm: records its arguments; fails with ``fail_with`` on stderr."""
    script = bin_dir / name
    exit_code = 1 if fail_with else 0
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"sys.stderr.write({fail_with!r})\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(0o755)


async def test_compose_and_helm_drive_their_cli(tmp_path: Path) -> None:
    bin_dir, calls, rec = tmp_path / "bin", tmp_path / "calls", Recorder()
    bin_dir.mkdir()
    _fake_tool(bin_dir, "docker", calls)
    _fake_tool(bin_dir, "helm", calls, fail_with="Error: chart 'db' version 1.2.3 not found")
    compose = ComponentSpec(
        deployment_id="stack", name="app", profile=ProfileType.COMPOSE,
        properties=(("compose", "services: {web: {image: nginx}}\n"),),
    )  # fmt: skip
    helm = ComponentSpec(
        deployment_id="chart", name="db", profile=ProfileType.HELM,
        properties=(("repository", "oci://registry.invalid/db"), ("revision", "1.2.3")),
        env=(("siteId", "SID-1"),),
    )  # fmt: skip
    runtimes = default_runtimes(search_path=str(bin_dir))
    async with Reconciler(tmp_path / "s", {}.__getitem__, rec, runtimes=runtimes) as rc:
        await rc.apply(1, [deployment("stack", compose), deployment("chart", helm)])
        await rec.wait_for(lambda s: s.deployment_id == "stack" and s.state is INSTALLED)
        chart = await rec.wait_for(lambda s: s.deployment_id == "chart" and s.state is FAILED)
        assert chart.error is not None and chart.error.code == "helm-up-failed"
        assert "exited with status 1" in chart.error.message
        assert "version 1.2.3 not found" in chart.error.message
        compose_file = tmp_path / "s" / "work" / "stack" / "app" / "compose.yaml"
        assert compose_file.read_text() == "services: {web: {image: nginx}}\n"
        lines = read(calls).splitlines()
        assert f"compose -p stack-app -f {compose_file} up -d --remove-orphans" in lines
        assert (
            "upgrade --install chart-db oci://registry.invalid/db --version 1.2.3 "
            "--namespace default --create-namespace --wait --set-string siteId=SID-1"
        ) in lines
        mark = len(rec.statuses)
        await rc.apply(2, [deployment("chart", helm)])
        await rec.wait_for(lambda s: s.state is DeploymentState.REMOVED, after=mark)
        assert f"compose -p stack-app -f {compose_file} down --remove-orphans" in read(calls)
    # Agent shutdown leaves helm/compose workloads alone: no uninstall of the chart.
    assert "uninstall" not in read(calls)
