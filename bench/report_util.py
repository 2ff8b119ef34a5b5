"""What every benchmark scenario writes, written the same way: a JSON file with all raw figures,
the parameters and the machine; a markdown table of the headline figures; PNG plots.

Scenarios call :func:`machine_info` once, collect their runs, and finish with
:func:`write_report`, which writes ``<out>/<scenario>.json``, ``<out>/<scenario>.md`` and
returns the paths. Plots go through :func:`plot_series` (matplotlib, Agg backend, imported
lazily so a scenario without plots does not pay for it).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(
    packages: Iterable[str] = ("aioquic", "qh3", "cryptography", "uvloop", "anyio"),
) -> dict[str, Any]:
    """Where and when a figure was measured: cores, CPU model, memory, versions, date (UTC)."""
    try:
        mem_kb = int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")
            )
        )
    except (OSError, StopIteration, ValueError):
        mem_kb = None
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_gib": round(mem_kb / (1 << 20), 1) if mem_kb else None,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "packages": {name: _version(name) for name in packages},
        "margo_stream": _version("margo-stream"),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def machine_line(machine: Mapping[str, Any]) -> str:
    """One line for a table caption: ``2 cores, AMD EPYC, 23.4 GiB, Python 3.11.2, aioquic 1.7.2``."""
    packages = machine.get("packages", {})
    parts = [f"{machine.get('nproc')} cores", str(machine.get("cpu_model"))]
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']} GiB")
    parts.append(f"Python {machine.get('python')}")
    parts += [f"{k} {v}" for k, v in packages.items() if v]
    return ", ".join(parts)


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --------------------------------------------------------------------------- /proc sampling


@dataclass(frozen=True, slots=True)
class ProcSample:
    rss_kb: int
    cpu_s: float  # utime + stime, seconds


def sample_process(pid: int) -> ProcSample:
    """RSS (VmRSS from /proc/PID/status) and CPU time (utime+stime from /proc/PID/stat)."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
            break
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; state is fields[0]
    utime, stime = int(fields[11]), int(fields[12])
    return ProcSample(rss_kb=rss_kb, cpu_s=(utime + stime) / CLK_TCK)


def cpu_percent(before: ProcSample, after: ProcSample, seconds: float) -> float:
    """CPU used between two samples as a percentage of one core."""
    return 100.0 * (after.cpu_s - before.cpu_s) / seconds if seconds > 0 else 0.0


# --------------------------------------------------------------------------- figures


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: Any, digits: int = 1) -> str:
    """A figure for a table: thousands separators, fixed decimals, em dash for missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells go through :func:`fmt` unless already strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [c if isinstance(c, str) else fmt(c) for c in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def write_markdown(path: Path, title: str, blocks: Sequence[str]) -> Path:
    """``# title`` then each block (tables, paragraphs) separated by blank lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = f"# {title}\n\n" + "\n".join(b.rstrip() + "\n" for b in blocks)
    path.write_text(body)
    return path


def write_report(
    out: Path, scenario: str, data: Mapping[str, Any], title: str, blocks: Sequence[str]
) -> tuple[Path, Path]:
    """``<out>/<scenario>.json`` (everything) and ``<out>/<scenario>.md`` (the tables)."""
    return (
        write_json(out / f"{scenario}.json", data),
        write_markdown(out / f"{scenario}.md", title, blocks),
    )


def plot_series(
    path: Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    step: bool = False,
    logx: bool = False,
) -> Path:
    """One PNG with a line per series (label -> (xs, ys)); ``logx`` for a logarithmic x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label, (xs, ys) in series.items():
        if step:
            ax.step(xs, ys, where="post", label=label)
        else:
            ax.plot(xs, ys, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def downsample(
    points: Sequence[tuple[float, float]], limit: int = 400
) -> list[tuple[float, float]]:
    """At most ``limit`` points of a curve, always keeping the last one."""
    if len(points) <= limit:
        return list(points)
    stride = len(points) / limit
    picked = [points[int(i * stride)] for i in range(limit)]
    if picked[-1] != points[-1]:
        picked.append(points[-1])
    return picked


def udp_counters() -> dict[str, int]:
    """This machine's UDP counters since boot (/proc/net/snmp): ``InDatagrams`` (delivered to
    a socket), ``RcvbufErrors`` (dropped for want of receive buffer space), ...; empty where
    there is no such file."""
    try:
        with open("/proc/net/snmp") as f:
            lines = [line.split() for line in f if line.startswith("Udp:")]
        return {name: int(value) for name, value in zip(lines[0][1:], lines[1][1:], strict=True)}
    except (OSError, ValueError, IndexError):
        return {}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linearly interpolated; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def poll_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """``predicate()``'s first truthy value, polled until ``timeout`` (errors count as falsy);
    ``TimeoutError`` naming ``what`` after that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - retried until the deadline
            value = None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
