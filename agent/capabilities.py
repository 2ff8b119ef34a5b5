"""The device's capabilities in Margo's device-capabilities fields (rc.3).

Runtimes are reported by name, in both ``supportedRuntimes`` and ``supportedDeploymentTypes``:
``process`` always; ``docker`` and ``helm`` when their tools are on PATH; ``wasm`` when the
wasmtime package imports (``agent.runtime.wasm``: the agent then runs ``wasm`` components).
rc.3 enumerates only ``oci``/``custom`` runtimes and ``helm``/``compose``/``custom`` deployment
types, and says a ``custom`` value is detailed in an ``x-<name>-extensions`` object; our hello
carries no extension objects, so the names stand for themselves, and the controller's matching
(``margo_stream.state.capabilities.runs``) accepts a runtime either by name or as ``custom``
plus an extension naming it, which is how a non-margo-stream rc.3 device would say ``wasm``.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import psutil

from agent.runtime.wasm import wasmtime_available
from margo_stream.protocol.messages import Capabilities, Cpu, TypedItem


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.0f} Gi"


def _dmi(name: str) -> str | None:
    try:
        value = Path(f"/sys/class/dmi/id/{name}").read_text().strip()
    except OSError:
        return None
    return value or None


def collect(device_id: str, state_dir: Path, labels: dict[str, str]) -> Capabilities:
    runtimes = ["process"]
    if shutil.which("docker"):
        runtimes.append("docker")
    if shutil.which("helm"):
        runtimes.append("helm")
    deployment_types = ["process", "compose", "helm.v3"]
    if wasmtime_available():
        runtimes.append("wasm")
        deployment_types.append("wasm")
    interfaces = sorted(
        {
            "ethernet"
            if name.startswith(("eth", "en"))
            else "loopback"
            if name == "lo"
            else "other"
            for name in psutil.net_if_addrs()
        }
    )
    return Capabilities(
        id=device_id,
        vendor=_dmi("sys_vendor"),
        modelNumber=_dmi("product_name"),
        serialNumber=None,
        cpus=[Cpu(cores=os.cpu_count() or 1, architecture=platform.machine() or "unknown")],
        memory=_gib(psutil.virtual_memory().total),
        storage=_gib(shutil.disk_usage(state_dir).total),
        interfaces=[TypedItem(type=t) for t in interfaces],
        supportedRuntimes=runtimes,
        supportedDeploymentTypes=deployment_types,
        labels=labels,
    )
