"""The runtimes an agent has by default (the concrete ones, assembled in one place)."""

from __future__ import annotations

from agent.runtime.base import Runtime
from agent.runtime.external import ComposeRuntime, HelmRuntime
from agent.runtime.process import ProcessRuntime
from margo_stream.state.spec import ProfileType


def default_runtimes(
    *, stop_grace: float = 5.0, search_path: str | None = None
) -> dict[ProfileType, Runtime]:
    """process, compose and helm.v3.

    ``search_path`` replaces ``$PATH`` when looking for ``docker``/``helm`` (tests use it).
    """
    runtimes: list[Runtime] = [
        ProcessRuntime(stop_grace=stop_grace),
        ComposeRuntime(search_path=search_path),
        HelmRuntime(search_path=search_path),
    ]
    return {rt.profile: rt for rt in runtimes}
