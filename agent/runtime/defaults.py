"""The runtimes an agent has by default (the concrete ones, assembled in one place)."""

from __future__ import annotations

from agent.runtime.base import Runtime
from agent.runtime.external import ComposeRuntime, HelmRuntime
from agent.runtime.process import ProcessRuntime
from agent.runtime.wasm import WasmRuntime, wasmtime_available
from agent.users import RunAs
from margo_stream.state.spec import ProfileType


def default_runtimes(
    *, stop_grace: float = 5.0, search_path: str | None = None, run_as: RunAs | None = None
) -> dict[ProfileType, Runtime]:
    """process, compose and helm.v3, and wasm when wasmtime imports.

    ``search_path`` replaces ``$PATH`` when looking for ``docker``/``helm`` (tests use it).
    ``run_as``: the user process and wasm components run as (``None``: the agent's). Compose
    and helm run as the agent whatever it is: they drive their own daemons (dockerd, the
    cluster).
    """
    runtimes: list[Runtime] = [
        ProcessRuntime(stop_grace=stop_grace, run_as=run_as),
        ComposeRuntime(search_path=search_path),
        HelmRuntime(search_path=search_path),
    ]
    if wasmtime_available():
        runtimes.append(WasmRuntime(run_as=run_as))
    return {rt.profile: rt for rt in runtimes}
