"""The device's capabilities in Margo's device-capabilities fields (rc.3)."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import psutil

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
        supportedDeploymentTypes=["process", "compose", "helm.v3"],
        labels=labels,
    )
