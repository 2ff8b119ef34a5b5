"""The controller's configuration, validated once at start (pydantic: a trust boundary)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from margo_stream.errors import ConfigError
from margo_stream.transport.congestion import DEFAULT_CONGESTION_CONTROL, CongestionControl

STORE_SCHEMES = ("postgresql://", "postgres://")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    certs: Path
    data: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=4433, ge=0, le=65535)
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    api_tls_cert: Path | None = None
    api_tls_key: Path | None = None
    margo_api_host: str | None = None  # Margo rc.3 device pull API (HTTPS, client certs)
    margo_api_port: int = Field(default=0, ge=0, le=65535)
    h2_push_host: str | None = None  # HTTP/2 push transport (for the bench's comparison)
    h2_push_port: int = Field(default=0, ge=0, le=65535)
    tcp_host: str | None = None  # the channel over TCP (HTTP/2, mutual TLS): --tcp-listen
    tcp_port: int = Field(default=0, ge=0, le=65535)
    idle_timeout: float = Field(default=60.0, gt=1)
    congestion_control: CongestionControl = DEFAULT_CONGESTION_CONTROL
    keepalive: float = Field(default=20.0, gt=0)  # 3x inside the idle timeout; see bench connect
    hello_timeout: float = Field(default=10.0, gt=0)
    manifest_lifetime_days: float = Field(default=30.0, gt=0)
    push_window: int = Field(default=512, ge=1)  # pushes awaiting their device's answer at once
    touch_interval: float = Field(default=5.0, gt=0)
    enroll_host: str | None = None  # EST enrolment over HTTPS (controller/enroll.py)
    enroll_port: int = Field(default=0, ge=0, le=65535)
    device_cert_lifetime: float = Field(default=30 * 86400.0, ge=1)  # seconds, EST-issued
    max_connection_age: float = Field(default=86400.0, ge=1)  # seconds, jittered +-10%
    # --- hostile input (issue 14) ---
    # QUIC address validation: Retry always, only while many handshakes are half-open, or never
    quic_retry: Literal["always", "auto", "never"] = "auto"
    handshake_timeout: float = Field(default=5.0, gt=0)  # half-open state freed after this
    max_half_open: int = Field(default=2048, ge=1)  # handshakes in progress, all sources
    max_half_open_per_address: int = Field(default=256, ge=1)  # unvalidated, per source IP
    api_max_body: int = Field(default=8 << 20, ge=1024)  # operator request bodies, bytes
    telemetry_retention: float = Field(default=7 * 86400.0, ge=60)  # seconds
    telemetry_max_bytes: int = Field(default=1 << 30, ge=1 << 20)  # per tenant, bytes
    event_retention: float = Field(default=90 * 86400.0, ge=60)  # seconds
    audit_retention: float = Field(default=365 * 86400.0, ge=60)  # terminal audit, seconds
    # --- several controllers (issue 15) ---
    # None: the embedded SQLite store in ``data``; a PostgreSQL DSN: that database (shared)
    store: str | None = None
    # --- observability (issue 19) ---
    metrics_host: str | None = None  # --metrics: GET /metrics (Prometheus) on its own listener
    metrics_port: int = Field(default=0, ge=0, le=65535)
    otlp_endpoint: str | None = None  # --otlp-endpoint: OTLP/HTTP (protobuf) base URL

    @field_validator("otlp_endpoint")
    @classmethod
    def _check_otlp(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ConfigError(
                f"--otlp-endpoint takes an http:// or https:// URL (OTLP over HTTP), not {value!r}"
            )
        return value.rstrip("/") if value else None

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(STORE_SCHEMES):
            raise ConfigError(
                "--store takes a PostgreSQL DSN, postgresql://USER[:PASSWORD]@HOST[:PORT]/DB"
                " (or postgres://...); leave it out for the SQLite store in --data"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> ControllerConfig:
        if self.keepalive >= self.idle_timeout / 2:
            raise ValueError(
                f"keepalive {self.keepalive}s must be well inside the idle timeout "
                f"{self.idle_timeout}s (at most half)"
            )
        if (self.api_tls_cert is None) != (self.api_tls_key is None):
            raise ValueError("--api-tls-cert and --api-tls-key go together")
        if self.api_tls_cert is None and not is_loopback(self.api_host):
            raise ConfigError(
                f"refusing to serve the operator API over plain HTTP on {self.api_host}: "
                "plain HTTP is only allowed on loopback; give --api-tls-cert and --api-tls-key"
            )
        return self

    @property
    def db_path(self) -> Path:
        return self.data / "controller.db"

    @property
    def ready_file(self) -> Path:
        return self.data / "controller.json"
