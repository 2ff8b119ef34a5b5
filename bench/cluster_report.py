"""The figures of ``margo-bench cluster`` from what its runs recorded, and its tables: pure
functions (no process, no clock), so they are tested on their own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.report_util import markdown_table, median, percentile

COST_TARGET = 1.15  # two instances on PostgreSQL within 15 % of one


def failover_summary(
    n: int,
    t_kill: float,
    all_on_b: float | None,
    conns: Sequence[Sequence[Any]],
    pushed: list[dict[str, float]],
    held: dict[str, Any],
) -> dict[str, Any]:
    """One failover run. ``conns``: ``[device, controller index, time, "up" | "down"]``
    (controller 0 was killed at ``t_kill``); ``all_on_b``: when B's API showed all ``n`` on B;
    ``held``: ``devices_with_newest`` (devices holding their newest manifest in the store)."""
    down: dict[int, float] = {}
    up: dict[int, float] = {}
    for device, where, t, kind in conns:
        if t < t_kill:
            continue
        if kind == "down" and where == 0:
            down.setdefault(device, t)
        elif kind == "up" and where == 1:
            up.setdefault(device, t)
    detect = sorted(t - t_kill for t in down.values())
    rejoin = sorted(up[d] - down[d] for d in up if d in down)
    got = int(held.get("devices_with_newest", 0))
    return {
        "devices": n,
        "all_on_b_api_s": None if all_on_b is None else all_on_b - t_kill,
        "all_on_b_devices_s": max(up.values()) - t_kill if len(up) >= n else None,
        "on_b": len(up),
        "detect_p50_s": percentile(detect, 0.5) if detect else None,
        "detect_max_s": detect[-1] if detect else None,
        "rejoin_p50_s": percentile(rejoin, 0.5) if rejoin else None,
        "rejoin_max_s": rejoin[-1] if rejoin else None,
        "pushes": pushed,
        "devices_with_newest": got,
        "pushes_lost": n - got,
    }


def summarize_cost(result: dict[str, Any]) -> dict[str, Any]:
    """Per-unit CPU of one configuration from its marks ``(label, time, controller CPU s,
    PostgreSQL CPU s)``: ms per handshake, ms per device per pushed change, µs per idle device
    per second, each for the controllers and for PostgreSQL."""
    n = int(result["devices"])
    at = {label: (t, cpu, pg) for label, t, cpu, pg in result["marks"]}

    def delta(a: str, b: str, k: int) -> float:
        return float(at[b][k] - at[a][k])

    idle_s = delta("idle", "idled", 0)
    base_s = delta("base", "start", 0) if "base" in at else 0.0
    out = {k: v for k, v in result.items() if k != "marks"}
    for who, k in (("ctl", 1), ("pg", 2)):
        out[f"{who}_handshake_ms"] = 1000 * delta("start", "connected", k) / n
        out[f"{who}_push_ms"] = 1000 * delta("push", "pushed", k) / n
        out[f"{who}_idle_us_s"] = 1e6 * delta("idle", "idled", k) / idle_s / n
        # with no device connected: what the instances cost by themselves, ms per second
        base = delta("base", "start", k) / base_s if base_s > 0 else None
        out[f"{who}_base_ms_s"] = None if base is None else 1000 * base
        out[f"{who}_idle_net_us_s"] = (
            None if base is None else 1e6 * (delta("idle", "idled", k) / idle_s - base) / n
        )
    out["connect_s"] = delta("start", "connected", 0)
    out["push_s"] = delta("push", "pushed", 0)
    out["idle_s"] = idle_s
    return out


FIGURES = (
    ("handshake_ms", "CPU ms per handshake"),
    ("push_ms", "CPU ms per device per pushed change"),
    ("idle_us_s", "CPU µs per idle device per second"),
    ("base_ms_s", "CPU ms per second with no device (all instances)"),
    ("idle_net_us_s", "CPU µs per idle device per second, net of that"),
)


def ratios(run: Sequence[dict[str, Any]], num: str, den: str) -> dict[str, float | None]:
    """Controller figures of config ``num`` over ``den`` within one run."""
    by = {r["config"]: r for r in run}
    if num not in by or den not in by:
        return {}
    out: dict[str, float | None] = {}
    for f, _ in FIGURES:
        a, b = by[num].get(f"ctl_{f}"), by[den].get(f"ctl_{f}")
        out[f] = a / b if a is not None and b else None
    return out


def cost_rows(runs: Sequence[Sequence[dict[str, Any]]]) -> list[list[Any]]:
    """One row per configuration and figure source: medians over the runs."""
    rows: list[list[Any]] = []
    configs = [r["config"] for r in runs[0]] if runs else []
    for config in sorted(configs):
        mine = [r for run in runs for r in run if r["config"] == config]
        for who, label in (("ctl", "controllers"), ("pg", "PostgreSQL")):
            if who == "pg" and config.startswith("sqlite"):
                continue
            rows.append(
                [f"{config} {label}"] + [median(r[f"{who}_{f}"] for r in mine) for f, _ in FIGURES]
            )
    for num, den in (("pg-2", "pg-1"), ("pg-1", "sqlite-1")):
        each = [ratios(run, num, den) for run in runs]
        rows.append(
            [f"{num} / {den} (controllers)"]
            + [_ratio(median(e.get(f) for e in each)) for f, _ in FIGURES]
        )
    return rows


def report_blocks(data: dict[str, Any]) -> list[str]:
    blocks: list[str] = []
    fo = data.get("failover") or []
    if fo:
        heads = [
            "run",
            "devices",
            "kill → all on B (API), s",
            "kill → all on B (devices), s",
            "detect p50 / max, s",
            "rejoin p50 / max, s",
            "pushes lost (median row: the worst run)",
        ]
        rows: list[list[Any]] = []
        for i, r in enumerate(fo, start=1):
            rows.append(
                [
                    str(i),
                    r["devices"],
                    r["all_on_b_api_s"],
                    r["all_on_b_devices_s"],
                    _pair(r["detect_p50_s"], r["detect_max_s"]),
                    _pair(r["rejoin_p50_s"], r["rejoin_max_s"]),
                    r["pushes_lost"],
                ]
            )
        rows.append(
            [
                "median",
                fo[0]["devices"],
                median(r["all_on_b_api_s"] for r in fo),
                median(r["all_on_b_devices_s"] for r in fo),
                _pair(median(r["detect_p50_s"] for r in fo), median(r["detect_max_s"] for r in fo)),
                _pair(median(r["rejoin_p50_s"] for r in fo), median(r["rejoin_max_s"] for r in fo)),
                max(r["pushes_lost"] for r in fo),
            ]
        )
        blocks.append("## Failover (kill -9 of the instance holding every device)\n")
        blocks.append(markdown_table(heads, rows))
    cost = data.get("cost") or []
    if cost:
        blocks.append("## Coordination cost (CPU time, medians over the runs)\n")
        blocks.append(markdown_table(["configuration", *(t for _, t in FIGURES)], cost_rows(cost)))
        blocks.append(
            f"Target: pg-2 / pg-1 at most {COST_TARGET:.2f} for each figure; pg-2 is the sum "
            "of both instances' CPU, its devices split evenly over them."
        )
    return blocks


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _pair(a: float | None, b: float | None) -> str:
    return f"{'—' if a is None else f'{a:.2f}'} / {'—' if b is None else f'{b:.2f}'}"
