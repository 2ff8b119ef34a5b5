"""The agent's configuration, validated once at start."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from agent.controller_list import ControllerEntry


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    identity: Path
    # --controller, parsed (agent.controller_list.parse_controllers): tried in a shuffled order
    controllers: tuple[ControllerEntry, ...] = Field(min_length=1)
    controller_order_seed: str | None = None  # fixes the shuffle (tests); None: random
    server_name: str | None = None  # TLS name of the controller; default: the tenant
    state: Path
    labels: dict[str, str] = {}
    keepalive: float | None = Field(default=None, gt=0)  # None: what the controller says
    idle_timeout: float = Field(default=60.0, gt=1)
    connect_timeout: float = Field(default=10.0, gt=0)
    backoff_base: float = Field(default=0.5, gt=0)
    backoff_cap: float = Field(default=30.0, gt=0)
    terminal_enabled: bool = True
    terminal_max_sessions: int = Field(default=4, ge=0)
    terminal_idle_timeout: float = Field(default=900.0, gt=0)
    buffer_max_bytes: int = Field(default=256 << 20, ge=1 << 16)
    buffer_policy: str = Field(default="drop-oldest", pattern="^(drop-oldest|reject)$")
    commit_window_ms: float = Field(default=2.0, ge=0)
    metrics_interval: float = Field(default=30.0, gt=0)
    # Users process workloads and terminals run as (agent.users); None: the default
    workload_user: str | None = None
    terminal_user: str | None = None
