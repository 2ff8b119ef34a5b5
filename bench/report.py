"""``margo-bench report DIR``: the transport comparison a working group can read.

Reads every ``*.json`` in DIR written by ``margo-bench run``/``compare`` and writes
``DIR/report.md`` (per scenario: one row per transport with the median of its runs and every
run's value, ratios against ``quic`` from one run, the targets and whether they were met) and
PNG plots: push latency distributions, fan-out curves, connect curves, server memory per
device, lossy-link latencies.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.report_util import fmt, machine_line, markdown_table, median, plot_series

KIND = "margo-bench transports"

# summary key -> (column title, digits); the order is the table's
COLUMNS: dict[str, tuple[str, int]] = {
    "push_p50_ms": ("push p50 ms", 1),
    "push_p99_ms": ("push p99 ms", 1),
    "status_rtt_p50_ms": ("status round trip p50 ms", 1),
    "fanout_s": ("fan-out to all s", 2),
    "fanout_status_s": ("all statuses back s", 2),
    "fanout_missing": ("devices missed", 0),
    "fanout_server_cpu_ms_per_device": ("fan-out server CPU ms/device", 3),
    "fanout_devices_cpu_ms_per_device": ("fan-out devices' CPU ms/device", 3),
    "connect_rate_per_s": ("connects/s", 0),
    "server_rss_per_device_kb": ("server KB/device", 1),
    "server_cpu_ms_per_connect": ("server CPU ms/connect", 2),
    "idle_bytes_per_device_hour": ("idle bytes/device/h", 0),
    "idle_requests_per_device_hour": ("idle exchanges/device/h", 0),
    "idle_server_cpu_percent": ("idle server CPU %", 2),
    "worker_rss_per_device_kb": ("device-side KB/device", 1),
    "restart_s": ("controller kill -9 -> ready s", 2),
    "reconnect_p50_s": ("reconnect p50 s (from kill)", 2),
    "reconnect_p100_s": ("reconnect p100 s (from kill)", 2),
    "devices_back": ("devices back", 0),
    "telemetry_acked": ("telemetry records acked", 0),
    "telemetry_lost": ("telemetry lost (acked, not stored)", 0),
    "drain_s": ("drain s (controller ready -> last ack)", 2),
    "drain_per_s": ("records/s", 0),
    "drain_device_p50_s": ("per-device drain p50 s", 2),
    "drain_device_p100_s": ("per-device drain p100 s", 2),
    "devices_drained": ("devices drained", 0),
    "drain_failures": ("broken streams", 0),
    "telemetry_not_stored": ("telemetry not stored", 0),
    "telemetry_note": ("telemetry", 0),
    "lossy_push_p50_ms": ("push p50 ms", 1),
    "lossy_push_p99_ms": ("push p99 ms", 1),
    "interactive_p50_ms": ("interactive p50 ms", 1),
    "interactive_p99_ms": ("interactive p99 ms", 1),
    "bulk_mbit_s": ("bulk Mbit/s", 2),
}
LOWER_IS_BETTER = {
    k
    for k in COLUMNS
    if not k.endswith("_per_s")
    and k not in ("bulk_mbit_s", "devices_back", "devices_drained", "telemetry_acked")
}
TEXT = {"telemetry_note"}  # words, not figures: shown as they are, never compared


def load(directory: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("kind") == KIND:
            data["_file"] = path.name
            found.append(data)
    return found


def by_label(data: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for run in data["runs"]:
        out.setdefault(run["label"], []).append(run)
    return out


def summary_table(data: Mapping[str, Any]) -> str:
    groups = by_label(data)
    keys = [
        k
        for k in COLUMNS
        if any(r["summary"].get(k) is not None for runs in groups.values() for r in runs)
    ]
    headers = ["transport", "runs", *(COLUMNS[k][0] for k in keys)]
    rows = []
    for label, runs in groups.items():
        cells: list[Any] = [label, str(len(runs))]
        errors = [r["error"] for r in runs if r.get("error")]
        if errors:
            cells[1] += f" ({len(errors)} failed: {errors[0][:120]})"
        for key in keys:
            values = [r["summary"].get(key) for r in runs]
            if key in TEXT:
                cells.append(next((v for v in values if v), "—"))
                continue
            med = median(values)
            text = fmt(med, COLUMNS[key][1]) if med is not None else "—"
            if len(runs) > 1:
                text += " (" + ", ".join(fmt(v, COLUMNS[key][1]) for v in values) + ")"
            cells.append(text)
        rows.append(cells)
    return markdown_table(headers, rows)


def ratios(data: Mapping[str, Any]) -> str:
    """Every transport against quic on each figure, from the first run of each."""
    groups = by_label(data)
    if "quic" not in groups or len(groups) < 2:
        return ""
    quic = groups["quic"][0]["summary"]
    keys = [k for k in COLUMNS if isinstance(quic.get(k), int | float) and quic.get(k)]
    rows = []
    for label, runs in groups.items():
        if label == "quic":
            continue
        s = runs[0]["summary"]
        cells: list[Any] = [label]
        for key in keys:
            v = s.get(key)
            cells.append("—" if not isinstance(v, int | float) else f"{v / quic[key]:,.2f}x")
        rows.append(cells)
    return (
        "Ratio other / quic (run 1 of each; above 1 means quic's figure is lower):\n\n"
        + markdown_table(["transport", *(COLUMNS[k][0] for k in keys)], rows)
    )


def _first(groups: Mapping[str, list[dict[str, Any]]], prefix: str, key: str) -> float | None:
    for label, runs in groups.items():
        if label == prefix or (prefix == "rest-poll 15 s" and label == "rest-poll 15 s"):
            return runs[0]["summary"].get(key)
    return None


def targets(data: Mapping[str, Any]) -> list[str]:
    """The issue's targets that this scenario can judge, each met or not, and why."""
    groups = by_label(data)
    q = groups.get("quic")
    if not q:
        return []
    s = q[0]["summary"]
    lines = []

    def verdict(ok: bool | None, text: str) -> None:
        mark = "not measured" if ok is None else ("**met**" if ok else "**NOT met**")
        lines.append(f"- {text}: {mark}")

    rest = _first(groups, "rest-poll 15 s", "push_p50_ms")
    h2 = _first(groups, "h2-push", "push_p50_ms")
    if data["scenario"] == "push":
        qp = s.get("push_p50_ms")
        qp99 = s.get("push_p99_ms")
        verdict(
            None if qp is None or qp99 is None else qp <= PUSH_P50_MS and qp99 <= PUSH_P99_MS,
            f"quic push p50 at most {PUSH_P50_MS:g} ms and p99 at most {PUSH_P99_MS:g} ms "
            f"({fmt(qp, 1)} and {fmt(qp99, 1)} ms)",
        )
        verdict(
            None if rest is None or qp is None else qp * POLL_RATIO <= rest,
            f"quic push p50 ≥ {POLL_RATIO}x lower than rest-poll at 15 s "
            f"({fmt(qp, 1)} ms vs {fmt(rest, 1)} ms = {fmt(rest / qp if rest and qp else None, 0)}x)",
        )
        verdict(
            None if h2 is None or qp is None else qp <= h2,
            f"quic push p50 at most h2-push's ({fmt(qp, 1)} ms vs {fmt(h2, 1)} ms)",
        )
    if data["scenario"] == "connect":
        qb = s.get("idle_bytes_per_device_hour")
        rb = _first(groups, "rest-poll 15 s", "idle_bytes_per_device_hour")
        verdict(
            None if rb is None or qb is None else qb * 10 <= rb,
            f"quic idle bytes/device/h at most a tenth of rest-poll at 15 s "
            f"({fmt(qb, 0)} vs {fmt(rb, 0)} = {fmt(qb / rb if rb and qb else None, 3)})",
        )
    if data["scenario"] == "lossy":
        qi = s.get("interactive_p99_ms")
        hi = _first(groups, "h2-push", "interactive_p99_ms")
        verdict(
            None if hi is None or qi is None else qi < hi,
            f"under loss, quic interactive p99 during bulk lower than h2-push's "
            f"({fmt(qi, 1)} ms vs {fmt(hi, 1)} ms)",
        )
    return lines


def losses(data: Mapping[str, Any]) -> list[str]:
    """Plain statements of every figure where quic is not the best transport (median)."""
    groups = by_label(data)
    if "quic" not in groups:
        return []
    med = {
        label: {k: median(r["summary"].get(k) for r in runs) for k in COLUMNS if k not in TEXT}
        for label, runs in groups.items()
    }
    out = []
    for key in COLUMNS:
        q = med["quic"].get(key)
        if q is None or key in TEXT:
            continue
        for label, values in med.items():
            v = values.get(key)
            if label == "quic" or v is None:
                continue
            better = v < q if key in LOWER_IS_BETTER else v > q
            if better and abs(v - q) > 0.05 * max(abs(q), 1e-9):
                out.append(
                    f"- quic loses on **{COLUMNS[key][0]}** to {label}: "
                    f"{fmt(q, COLUMNS[key][1])} vs {fmt(v, COLUMNS[key][1])}." + WHY.get(key, "")
                )
    return out


PUSH_P50_MS, PUSH_P99_MS = 10.0, 30.0  # at 1,000 connected devices (issue 20)
POLL_RATIO = 750  # push p50 at least this many times lower than Margo's 15 s polling

PUSH_WHY = (
    " Every push transport shares the controller's apply path (API, store, signing), and every"
    " transport's device runs the agent's own verifier (root metadata, the operator's signature"
    " over every deployment) and writes its trust state before it reports. Profiled"
    " (bench/RESULTS.md, issue 20): a fan-out is bound by the busier core, h2-push's by its"
    " controller, QUIC's by the simulated devices' core, where a QUIC device runs the agent's"
    " own channel and aioquic's packets in Python while an HTTP/2 device is a lean client whose"
    " acknowledgements come from the kernel (the first fan-out after connecting also carries"
    " the operator's certificate); a lone push's round trip is the API (the YAML read and the"
    " signature checks), the next manifest signed, the device's checks and durable trust-state"
    " write, and the status stored and acked."
)
RECONNECT_WHY = (
    " After kill -9 the new controller drops the devices' packets for connections it"
    " does not know (no stateless reset), so a QUIC device notices only when nothing"
    " has arrived for three keepalive intervals, checked once per interval: 60-80 s"
    " at the 20 s default, shorter with --keepalive. TCP devices see the reset at"
    " once; a rest-poll device is back at its next poll."
)
WHY = {
    "reconnect_p50_s": RECONNECT_WHY,
    "reconnect_p100_s": RECONNECT_WHY,
    "server_rss_per_device_kb": " Each QUIC connection keeps aioquic's per-connection state in"
    " Python (packet spaces, crypto contexts, stream buffers, our session objects), while a TLS"
    " socket's state is mostly in OpenSSL/kernel memory; Mosquitto is C.",
    "connect_rate_per_s": " The QUIC handshake (mutual TLS in aioquic's pure-Python TLS 1.3) costs"
    " more server CPU than OpenSSL's TLS over TCP.",
    "server_cpu_ms_per_connect": " aioquic's TLS 1.3 and packet protection run in Python; the TCP"
    " transports use OpenSSL in C.",
    "push_p50_ms": PUSH_WHY,
    "push_p99_ms": PUSH_WHY,
    "status_rtt_p50_ms": PUSH_WHY,
    "fanout_s": PUSH_WHY,
    "fanout_status_s": PUSH_WHY,
    "idle_server_cpu_percent": " QUIC keepalive pings are processed by Python on both ends.",
    "idle_bytes_per_device_hour": " Idle cost is the keepalive interval: the QUIC devices ping"
    " every --keepalive seconds (controller default 15 s, so a dead link is noticed within 45 s),"
    " each an encrypted packet plus the ACK it elicits; the HTTP/2 server pings every 30 s and"
    " the MQTT client every 60 s. A longer QUIC keepalive trades dead-link detection for bytes.",
    "worker_rss_per_device_kb": " Device-side memory of the bench's simulated devices (Python"
    " objects per client in a shared process), not of a real agent.",
    "interactive_p99_ms": " See the interactive latency plot; the QUIC status stream shares"
    " the congestion window with the bulk stream even though it is not blocked behind its losses.",
    "lossy_push_p99_ms": " A small push whose datagram is lost waits for aioquic's probe timeout"
    " (PTO, several RTTs) before it is sent again; the TCP relay models a loss as one RTO stall"
    " of the connection, which for a one-segment push is shorter. The two relays cannot lose"
    " data the same way, so tails under loss compare loss recovery as each stack does it.",
    "interactive_p50_ms": " rest-poll's connection carries almost no bulk: a device downloads"
    " at most one bulk file per 15 s poll, so its probes rarely queue behind anything.",
    "bulk_mbit_s": " aioquic's congestion control and loss recovery in Python against the kernel's"
    " TCP.",
}


def plots(data: Mapping[str, Any], out: Path) -> list[Path]:
    scenario = data["scenario"]
    groups = by_label(data)
    written = []
    stem = Path(data["_file"]).stem
    if scenario == "push":
        series = {}
        for label, runs in groups.items():
            lat = sorted(x * 1000 for x in runs[0].get("push", {}).get("latencies_s", []))
            if lat:
                series[label] = (lat, [(i + 1) / len(lat) for i in range(len(lat))])
        if series:
            written.append(
                plot_series(
                    out / f"{stem}-latency.png",
                    series,
                    step=True,
                    title="push latency distribution (apply -> device verified)",
                    xlabel="ms (log)",
                    ylabel="fraction of pushes",
                    logx=True,
                )
            )
        fan = {}
        for label, runs in groups.items():
            first = (runs[0].get("push", {}).get("fanout") or [{}])[0]
            for key, suffix in (("curve", "verified"), ("status_curve", "installed")):
                curve = first.get(key) or []
                if curve:
                    fan[f"{label} {suffix}"] = (
                        [0.0] + [c[0] for c in curve],
                        [0.0] + [float(c[1]) for c in curve],
                    )
        if fan:
            written.append(
                plot_series(
                    out / f"{stem}-fanout.png",
                    fan,
                    step=True,
                    logx=True,
                    title="fan-out: devices holding the new desired state "
                    "(verified) and their status acknowledged (installed)",
                    xlabel="seconds since the apply (log)",
                    ylabel="devices",
                )
            )
    curves = {
        label: (
            [0.0] + [c[0] for c in runs[0]["connect"]["curve"]],
            [0.0] + [float(c[1]) for c in runs[0]["connect"]["curve"]],
        )
        for label, runs in groups.items()
        if runs[0].get("connect", {}).get("curve")
    }
    if curves and scenario == "connect":
        written.append(
            plot_series(
                out / f"{stem}-ramp.png",
                curves,
                step=True,
                title="devices connected over time",
                xlabel="seconds since go",
                ylabel="devices",
            )
        )
        written.append(
            bars(
                out / f"{stem}-memory.png",
                {
                    label: median(r["summary"].get("server_rss_per_device_kb") for r in runs)
                    for label, runs in groups.items()
                },
                title="server memory per connected device",
                ylabel="KB",
            )
        )
    if scenario == "lossy":
        series = {}
        for label, runs in groups.items():
            lat = sorted(runs[0].get("lossy", {}).get("interactive_s", []))
            if lat:
                series[label] = (
                    [x * 1000 for x in lat],
                    [(i + 1) / len(lat) for i in range(len(lat))],
                )
        if series:
            written.append(
                plot_series(
                    out / f"{stem}-interactive.png",
                    series,
                    step=True,
                    logx=True,
                    title="interactive round trip during bulk, lossy link",
                    xlabel="ms (log)",
                    ylabel="fraction",
                )
            )
    return written


def bars(path: Path, values: Mapping[str, float | None], *, title: str, ylabel: str) -> Path:
    """One PNG bar chart, a bar per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = {k: v for k, v in values.items() if v is not None}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.bar(list(heights), list(heights.values()))
    ax.set(title=title, ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def section(data: Mapping[str, Any], images: list[Path]) -> list[str]:
    p = data["params"]
    m = data["machine"]
    loads = [
        f"{r['label']} run {r['run']}: {r['load']['before'][0]:.2f}→{r['load']['after'][0]:.2f}"
        for r in data["runs"]
    ]
    blocks = [
        f"## {data['scenario']}: {p['agents']:,} devices per transport",
        f"Machine: {machine_line(m)}; {m['date']}. Load average (1 min) before→after each "
        f"run: {'; '.join(loads)}.",
        f"```\n{data['command']}\n```",
        "Medians over runs; every run's value in parentheses.\n\n" + summary_table(data),
    ]
    if r := ratios(data):
        blocks.append(r)
    if t := targets(data):
        blocks.append("Targets (judged on the first run):\n\n" + "\n".join(t))
    if lost := losses(data):
        blocks.append("Where quic loses:\n\n" + "\n".join(lost))
    blocks += [f"![{img.stem}]({img.name})" for img in images]
    return blocks


def write(directory: Path) -> list[Path]:
    directory = Path(directory)
    blocks: list[str] = []
    written: list[Path] = []
    merged: dict[str, dict[str, Any]] = {}
    for data in load(directory):  # files of one scenario (several `run`s) become one section
        into = merged.setdefault(data["scenario"], {**data, "runs": [], "commands": []})
        into["runs"] += data["runs"]
        into["commands"].append(data["command"])
    for data in merged.values():
        data["command"] = "\n".join(data["commands"])
        images = plots(data, directory)
        written += images
        blocks += section(data, images)
    path = directory / "report.md"
    path.write_text(
        "# margo-bench: transports compared\n\n" + "\n\n".join(b.rstrip() for b in blocks) + "\n"
    )
    return [path, *written]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: margo-bench report DIR", file=sys.stderr)
        return 2
    for path in write(Path(argv[0])):
        print(f"wrote {path}", file=sys.stderr)
    return 0
