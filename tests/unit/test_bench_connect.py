"""``margo-bench connect`` end to end at a tiny scale: a real controller, one worker of
simulated agents, the bare-aioquic reference, and a report with every figure."""

from __future__ import annotations

import json

import pytest

from bench import cli
from bench.report_util import markdown_table, sample_process

OURS_FIGURES = (
    "connected",
    "handshake_rate",
    "ramp_seconds",
    "handshake_latency_ms",
    "rss_before_kb",
    "rss_connected_kb",
    "rss_per_agent_kb",
    "idle_cpu_percent",
    "idle_datagrams_per_agent_minute",
    "idle_window_seconds",
    "alive_after_idle",
    "api_devices_connected",
    "server_cpu_ms_per_handshake",
    "timeline",
)
BARE_FIGURES = ("connected", "handshake_rate", "rss_per_connection_kb", "timeline")
SUMMARY = (
    "handshake_rate",
    "bare_handshake_rate",
    "rate_ratio",
    "rss_per_agent_kb",
    "idle_cpu_percent",
    "all_agents_held",
    "met",
)


@pytest.mark.parametrize("stack", ["qh3", "aioquic"])
def test_connect_tiny_run(tmp_path, stack):
    """The simulated agents run the agent's QUIC stack: qh3 (the default), or aioquic."""
    out = tmp_path / "out"
    code = cli.main(
        [
            "connect",
            "--quic-stack",
            stack,
            "--agents",
            "20",
            "--procs",
            "1",
            "--idle-seconds",
            "1",
            "--settle",
            "0.2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "connect.json").read_text())
    assert report["params"]["agents"] == 20
    assert report["params"]["quic_stack"] == stack
    for key in ("nproc", "cpu_model", "python", "packages", "date"):
        assert report["machine"][key], key
    assert report["machine"]["packages"]["aioquic"]
    (run,) = report["runs"]
    for key in OURS_FIGURES:
        assert run["ours"][key] is not None, key
    for key in BARE_FIGURES:
        assert run["bare"][key] is not None, key
    # every agent connected, stayed connected through the idle window, and the operator API
    # (bearer token of the tenant) listed all of them as connected
    assert run["ours"]["connected"] == 20
    assert run["ours"]["alive_after_idle"] == 20
    assert run["ours"]["api_devices_listed"] == run["ours"]["api_devices_connected"] == 20
    assert run["bare"]["connected"] == 20
    assert run["rate_ratio"] > 0
    for key in SUMMARY:
        assert key in report["summary"], key
    assert report["summary"]["all_agents_held"] is True
    md = (out / "connect.md").read_text()
    assert (
        "ours / bare handshake rate" in md
        and f"margo-bench connect --quic-stack {stack} --agents 20" in md
    )
    assert (out / "connect-ramp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_lists_scenarios(capsys):
    assert cli.main(["--help"]) == 0
    assert "connect" in capsys.readouterr().out
    assert cli.main(["no-such-scenario"]) == 2


def test_report_helpers(tmp_path):
    table = markdown_table(["a", "b"], [[1234, 1.5], ["x|y", None]])
    assert "| 1,234 | 1.5 |" in table and "x\\|y" in table and "—" in table
    import os

    sample = sample_process(os.getpid())
    assert sample.rss_kb > 0 and sample.cpu_s >= 0
