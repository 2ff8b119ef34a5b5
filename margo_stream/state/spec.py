"""What the agent runs: the resolved, runtime-ready form of a deployment.

Documents (``margo_stream.state.documents``) are parsed and their parameters applied to produce
these; runtimes (``agent.runtime``) only ever see these. Frozen so a spec can be compared with
the running one to decide whether a component must restart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ProfileType(enum.StrEnum):
    PROCESS = "process"
    COMPOSE = "compose"
    HELM = "helm.v3"
    WASM = "wasm"  # a WASI module run by the agent (margo_stream.state.wasm_spec)


class RestartPolicy(enum.StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class FileSpec:
    """An extra file travelling with a deployment (content-addressed)."""

    name: str  # relative path inside the deployment's files directory, no '..'
    digest: str  # sha256:<64 hex>


@dataclass(frozen=True, slots=True)
class ComponentSpec:
    """One component of one deployment, with parameters already applied."""

    deployment_id: str
    name: str
    profile: ProfileType
    # process profile
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # sorted (name, value) pairs
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
    working_dir: str | None = None  # None: <state>/work/<deployment>/<component>
    # compose / helm profiles: the component's properties as given (repository, revision, ...)
    properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """A whole deployment as the reconciler sees it."""

    deployment_id: str
    digest: str  # digest of the deployment document's exact bytes
    name: str
    profile: ProfileType
    components: tuple[ComponentSpec, ...]
    files: tuple[FileSpec, ...] = field(default=())
