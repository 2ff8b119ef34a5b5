"""``margo-bench connect``'s report: the summary over runs, the markdown table and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report_util import machine_line, markdown_table, median, plot_series

TARGETS = {
    "agents_held": 10_000,
    "rss_per_agent_kb": 100.0,
    "idle_cpu_percent": 10.0,
    "rate_ratio": 0.75,
}


def summarize(runs: list[dict[str, Any]], agents: int) -> dict[str, Any]:
    def col(side: str, key: str) -> list[Any]:
        return [r[side].get(key) for r in runs if r.get(side)]

    held = all(
        r["ours"]["connected"] == agents
        and r["ours"]["alive_after_idle"] == agents
        and r["ours"]["api_devices_connected"] == agents
        for r in runs
    )
    s: dict[str, Any] = {
        "agents": agents,
        "runs": len(runs),
        "all_agents_held": held,
        "handshake_rate": median(col("ours", "handshake_rate")),
        "handshake_rate_middle_80pct": median(col("ours", "handshake_rate_middle_80pct")),
        "bare_handshake_rate": median(col("bare", "handshake_rate")),
        "bare_handshake_rate_middle_80pct": median(col("bare", "handshake_rate_middle_80pct")),
        "rate_ratio": median(r["rate_ratio"] for r in runs),
        "rss_per_agent_kb": median(col("ours", "rss_per_agent_kb")),
        "bare_rss_per_connection_kb": median(col("bare", "rss_per_connection_kb")),
        "idle_cpu_percent": median(col("ours", "idle_cpu_percent")),
        "idle_datagrams_per_agent_minute": median(col("ours", "idle_datagrams_per_agent_minute")),
        "controller_cpu_percent_during_ramp": median(col("ours", "server_cpu_percent_during_ramp")),
        "bare_server_cpu_percent_during_ramp": median(
            col("bare", "server_cpu_percent_during_ramp")
        ),
    }
    s["met"] = {
        "agents_held": held and agents >= TARGETS["agents_held"],
        "rss_per_agent_kb": s["rss_per_agent_kb"] is not None
        and s["rss_per_agent_kb"] <= TARGETS["rss_per_agent_kb"],
        "idle_cpu_percent": s["idle_cpu_percent"] is not None
        and s["idle_cpu_percent"] <= TARGETS["idle_cpu_percent"],
        "rate_ratio": s["rate_ratio"] is not None and s["rate_ratio"] >= TARGETS["rate_ratio"],
    }
    return s


def markdown_blocks(report: dict[str, Any]) -> list[str]:
    s, p, runs = report["summary"], report["params"], report["runs"]

    def per_run(side: str, key: str, digits: int = 1) -> str:
        vals = [r[side].get(key) for r in runs if r.get(side)]
        return ", ".join("—" if v is None else f"{v:,.{digits}f}" for v in vals)

    def ok(key: str) -> str:
        return "yes" if s["met"][key] else "no"

    def untargeted(label: str, summary: str, side: str, key: str, digits: int) -> list[str]:
        """A row of a figure with no target: the median, each run's value."""
        value = s[summary]
        median_text = "—" if value is None else f"{value:,.{digits}f}"
        return [label, median_text, per_run(side, key, digits), "", ""]

    n = p["agents"]
    rows = [
        [
            "agents held (connected, alive after idle, listed connected by the API)",
            f"{min(r['ours']['api_devices_connected'] for r in runs):,} / {n:,}",
            ", ".join(
                f"{r['ours']['connected']:,}/{r['ours']['alive_after_idle']:,}/"
                f"{r['ours']['api_devices_connected']:,}"
                for r in runs
            ),
            f"{TARGETS['agents_held']:,}",
            ok("agents_held"),
        ],
        [
            "handshake rate, ours (mTLS + hello answered), agents/s",
            f"{s['handshake_rate']:,.1f}",
            per_run("ours", "handshake_rate"),
            "",
            "",
        ],
        [
            "handshake rate, bare aioquic (server-only TLS), handshakes/s",
            "—" if s["bare_handshake_rate"] is None else f"{s['bare_handshake_rate']:,.1f}",
            per_run("bare", "handshake_rate"),
            "",
            "",
        ],
        [
            "ours / bare handshake rate",
            "—" if s["rate_ratio"] is None else f"{s['rate_ratio']:.2f}",
            ", ".join("—" if r["rate_ratio"] is None else f"{r['rate_ratio']:.2f}" for r in runs),
            f"≥ {TARGETS['rate_ratio']:.2f}",
            ok("rate_ratio"),
        ],
        [
            "controller RSS per connected agent, KB",
            f"{s['rss_per_agent_kb']:,.1f}",
            per_run("ours", "rss_per_agent_kb"),
            f"≤ {TARGETS['rss_per_agent_kb']:.0f}",
            ok("rss_per_agent_kb"),
        ],
        [
            "bare aioquic server RSS per connection, KB",
            "—"
            if s["bare_rss_per_connection_kb"] is None
            else f"{s['bare_rss_per_connection_kb']:,.1f}",
            per_run("bare", "rss_per_connection_kb"),
            "",
            "",
        ],
        [
            f"controller idle CPU, {p['idle_seconds']:.0f} s window, keepalive {p['keepalive']:g} s, "
            "% of one core",
            f"{s['idle_cpu_percent']:.2f}",
            per_run("ours", "idle_cpu_percent", 2),
            f"≤ {TARGETS['idle_cpu_percent']:.0f}",
            ok("idle_cpu_percent"),
        ],
        untargeted(
            "UDP datagrams in the idle window, both ways, per agent and minute",
            "idle_datagrams_per_agent_minute",
            "ours",
            "idle_datagrams_per_agent_minute",
            2,
        ),
        [
            "controller CPU during the ramp, % of one core",
            f"{s['controller_cpu_percent_during_ramp']:.0f}",
            per_run("ours", "server_cpu_percent_during_ramp", 0),
            "",
            "",
        ],
        untargeted(
            "bare server CPU during the ramp, % of one core",
            "bare_server_cpu_percent_during_ramp",
            "bare",
            "server_cpu_percent_during_ramp",
            0,
        ),
    ]
    table = markdown_table(["figure", f"median of {len(runs)}", "per run", "target", "met"], rows)
    caption = (
        f"{n:,} agents, {p['procs']} worker process(es), {p['concurrency']} handshakes in "
        f"flight per worker, controller pinned to CPU {p['server_cpus']}, workers to CPU "
        f"{p['client_cpus']}. Machine: {machine_line(report['machine'])}; "
        f"{report['machine']['date']}."
    )
    command = f"```\n{report['command']}\n```"
    note = (
        (
            "The 10,000-agent and 10 % idle-CPU targets are stated for N = 10,000; at a smaller N "
            "the agents-held row reads 'no' by definition."
        )
        if n < TARGETS["agents_held"]
        else ""
    )
    return [caption, table, command, note]


def plot(report: dict[str, Any], path: Path) -> Path:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in report["runs"]:
        for side, label in (("ours", "margo-stream (mTLS + hello)"), ("bare", "bare aioquic")):
            timeline = r.get(side, {}).get("timeline")
            if timeline:
                xs = [0.0] + [t for t, _ in timeline]
                ys = [0.0] + [float(c) for _, c in timeline]
                series[f"{label}, run {r['run']}"] = (xs, ys)
    return plot_series(
        path,
        series,
        title=f"connect: {report['params']['agents']:,} agents ramp",
        xlabel="seconds since start",
        ylabel="agents connected",
        step=True,
    )
