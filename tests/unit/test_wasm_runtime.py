"""The reconciler driving real wasm components: worker processes running WASI guests on
wasmtime, in a temporary state directory. Documents are parsed from YAML as the agent does;
tests wait on statuses or on files the guests write, always under ``anyio.fail_after``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

pytest.importorskip("wasmtime")

from agent.reconciler import Reconciler  # noqa: E402
from agent.runtime.wasm import WasmRunner, WasmRuntime  # noqa: E402
from margo_stream.state.documents import load_spec  # noqa: E402
from margo_stream.state.spec import DeploymentSpec, ProfileType  # noqa: E402
from margo_stream.state.status import ComponentStatus, DeploymentState  # noqa: E402
from tests.harness import pid_alive  # noqa: E402
from tests.integration.test_process_runtime import (  # noqa: E402
    Blobs,
    Recorder,
    read,
    wait_until,
)
from tests.unit.test_wasm_guests import GROW, PROBE, SPIN, TRAP, wasm_yaml  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

INSTALLED, FAILED = DeploymentState.INSTALLED, DeploymentState.FAILED


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def component(
    rec: Recorder, dep: str, pred: Callable[[ComponentStatus], bool]
) -> ComponentStatus:
    """The first component status of ``dep`` matching ``pred`` (waiting for it)."""
    status = await rec.wait_for(
        lambda s: s.deployment_id == dep and any(pred(c) for c in s.components)
    )
    return next(c for c in status.components if pred(c))


def failed_with(code: str) -> Callable[[ComponentStatus], bool]:
    return lambda c: c.state is FAILED and c.error is not None and c.error.code == code


def wasm_doc(
    blobs: Blobs, dep: str, guest: str, props: str, *, params: str = "", module: str = "g.wat"
) -> DeploymentSpec:
    """A ``wasm`` deployment of one component ``c`` running ``guest`` (WAT text)."""
    digest = blobs.add(guest.encode())
    text = wasm_yaml(dep, "c", module, digest, props, params)
    spec = load_spec(text.encode(), source=dep)
    assert spec.profile is ProfileType.WASM
    return spec


def runtimes(**kw: object) -> dict:
    options: dict = {"backoff_initial": 0.05, "backoff_max": 0.2, "healthy_after": 30.0}
    options.update(kw)
    return {ProfileType.WASM: WasmRuntime(**options)}


async def test_a_guest_writes_its_file_with_args_env_and_parameters(tmp_path: Path) -> None:
    state, blobs, rec = tmp_path / "state", Blobs(), Recorder()
    spec = wasm_doc(
        blobs,
        "writer",
        PROBE,
        "          args: [--out, result.txt, two words]\n"
        "          env: {GREETING: hello, DEBUG: true}\n"
        "          restart: never",
        params="  parameters:\n    site:\n      value: SID-1\n"
        "      targets: [{pointer: ENV.SITE_ID, components: [c]}]\n",
    )
    async with Reconciler(state, blobs.__getitem__, rec, runtimes=runtimes()) as reconciler:
        await reconciler.apply(1, [spec])
        done = await component(rec, "writer", lambda c: c.state is INSTALLED)
        assert done.error is None
        runner = reconciler.runner("writer", "c")
        assert isinstance(runner, WasmRunner)
        await wait_until(lambda: runner.last_result is not None, "the run's result")
        assert runner.last_result == {"kind": "exit", "code": 0}
        work = state / "work" / "writer"
        assert (work / "c" / "result.txt").read_text().splitlines() == [
            "--out",
            "result.txt",
            "two words",
            "DEBUG=true",
            "GREETING=hello",
            "SITE_ID=SID-1",
        ]
        assert "wasm module g.wat" in read(work / "c.log")
        assert runner.runs == 1


async def test_trap_memory_fuel_and_time_limits_fail_naming_why(tmp_path: Path) -> None:
    state, blobs, rec = tmp_path / "state", Blobs(), Recorder()
    specs = [
        wasm_doc(blobs, "trap", TRAP, "          restart: never"),
        wasm_doc(blobs, "grow", GROW, "          memoryLimit: 1Mi\n          restart: never"),
        wasm_doc(blobs, "spin", SPIN, "          fuel: 200000\n          restart: never"),
        wasm_doc(blobs, "slow", SPIN, "          timeout: 1s\n          restart: never"),
        wasm_doc(blobs, "bad", "(module (func))", "          restart: never"),
    ]
    async with Reconciler(state, blobs.__getitem__, rec, runtimes=runtimes()) as reconciler:
        await reconciler.apply(1, specs)
        trap = await component(rec, "trap", failed_with("trap"))
        assert trap.error is not None
        assert "wasm `unreachable` instruction executed" in trap.error.message
        assert "boom" in trap.error.message and trap.error.source == "wasm"
        assert "about to trap" in read(state / "work" / "trap" / "c.log")
        grow = await component(rec, "grow", failed_with("memory-limit"))
        assert grow.error is not None and "memoryLimit 1 MiB" in grow.error.message
        spin = await component(rec, "spin", failed_with("fuel-limit"))
        assert spin.error is not None and "fuel limit 200000" in spin.error.message
        slow = await component(rec, "slow", failed_with("time-limit"))
        assert slow.error is not None and "timeout" in slow.error.message
        assert "1 s" in slow.error.message
        bad = await component(rec, "bad", failed_with("module-invalid"))
        assert bad.error is not None and "_start" in bad.error.message


async def test_restart_policies(tmp_path: Path) -> None:
    state, blobs, rec = tmp_path / "state", Blobs(), Recorder()
    fail_args = "          args: [--fail, runs.txt]\n"
    specs = [
        wasm_doc(blobs, "never", PROBE, fail_args + "          restart: never"),
        wasm_doc(blobs, "onfail", PROBE, fail_args + "          restart: on-failure"),
        wasm_doc(
            blobs, "always", PROBE, "          args: [x, runs.txt]\n          restart: always"
        ),
        wasm_doc(
            blobs, "once", PROBE, "          args: [x, runs.txt]\n          restart: on-failure"
        ),
    ]
    work = state / "work"
    async with Reconciler(state, blobs.__getitem__, rec, runtimes=runtimes()) as reconciler:
        await reconciler.apply(1, specs)
        never = await component(rec, "never", failed_with("exit-3"))
        assert never.error is not None and "exited with status 3" in never.error.message
        # on-failure: restarted until the crash loop is reported, and on
        await component(rec, "onfail", failed_with("crash-loop"))
        await wait_until(lambda: read(work / "onfail/c/runs.txt").count("--fail") >= 4, "reruns")
        # always: a clean exit is restarted too
        await wait_until(lambda: read(work / "always/c/runs.txt").count("x\n") >= 3, "reruns")
        await component(rec, "once", lambda c: c.state is INSTALLED)
        runners = {d: reconciler.runner(d, "c") for d in ("never", "once")}
        for runner in runners.values():
            assert isinstance(runner, WasmRunner)
            await wait_until(lambda r=runner: r.last_result is not None, "a result")
        await anyio.sleep(0.5)  # a restart would come after 0.05 s of backoff
        assert read(work / "never/c/runs.txt").count("--fail") == 1
        assert read(work / "once/c/runs.txt").count("x\n") == 1
        assert all(r is not None and r.runs == 1 for r in runners.values())


async def test_stopping_kills_a_busy_guest_at_once(tmp_path: Path) -> None:
    state, blobs, rec = tmp_path / "state", Blobs(), Recorder()
    spec = wasm_doc(blobs, "busy", SPIN, "          restart: always")
    async with Reconciler(state, blobs.__getitem__, rec, runtimes=runtimes()) as reconciler:
        await reconciler.apply(1, [spec])
        await component(rec, "busy", lambda c: c.state is INSTALLED)
        runner = reconciler.runner("busy", "c")
        assert isinstance(runner, WasmRunner)
        await wait_until(lambda: runner.pid is not None, "the worker")
        pid = runner.pid
        assert pid is not None and os.getpgid(pid) == pid
        started = anyio.current_time()
        await reconciler.apply(2, [])
        assert anyio.current_time() - started < 3.0
        assert not pid_alive(pid)
        assert runner.runs == 1
