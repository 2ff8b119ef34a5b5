"""The agent's configuration, validated once at start."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.controller_list import ControllerEntry
from margo_stream.transport.congestion import DEFAULT_CONGESTION_CONTROL, CongestionControl
from margo_stream.transport.quic_stack import DEFAULT_QUIC_STACK, QuicStack


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    identity: Path
    # --controller, parsed (agent.controller_list.parse_controllers): tried in a shuffled order
    controllers: tuple[ControllerEntry, ...] = Field(min_length=1)
    controller_order_seed: str | None = None  # fixes the shuffle (tests); None: random
    # --tcp-controller: where the TCP carrier goes; () = each --controller's own host and port,
    # one entry = for every controller, as many as --controller = paired by position
    tcp_controllers: tuple[ControllerEntry, ...] = ()
    quic_timeout: float = Field(default=5.0, gt=0)  # no QUIC handshake by then: TCP
    quic_retry: float = Field(default=300.0, gt=0)  # on TCP, probe QUIC this often
    proxy: str | None = None  # --proxy URL (validated by margo_stream.transport.proxy)
    server_name: str | None = None  # TLS name of the controller; default: the tenant
    state: Path
    labels: dict[str, str] = {}
    keepalive: float | None = Field(default=None, gt=0)  # None: what the controller says
    idle_timeout: float = Field(default=60.0, gt=1)
    congestion_control: CongestionControl = DEFAULT_CONGESTION_CONTROL
    quic_stack: QuicStack = DEFAULT_QUIC_STACK  # which QUIC implementation the agent dials with
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
    metrics_host: str | None = None  # --metrics: GET /metrics (Prometheus) on this listener
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # Users process workloads and terminals run as (agent.users); None: the default
    workload_user: str | None = None
    terminal_user: str | None = None

    @model_validator(mode="after")
    def _tcp_pairs(self) -> AgentConfig:
        count = len(self.tcp_controllers)
        if count > 1 and count != len(self.controllers):
            raise ValueError(
                f"--tcp-controller names {count} entries for {len(self.controllers)} "
                "--controller entries: give one (for all) or one per --controller entry"
            )
        return self

    def tcp_entry(self, entry: ControllerEntry) -> ControllerEntry | None:
        """The ``--tcp-controller`` entry that stands for ``entry``; None: the same host and
        port as ``entry``."""
        if not self.tcp_controllers:
            return None
        if len(self.tcp_controllers) == 1:
            return self.tcp_controllers[0]
        return dict(zip(self.controllers, self.tcp_controllers, strict=True)).get(entry)
