"""``storm`` and ``drain`` at a tiny size, for real (controller, device processes on loopback):
the controller is killed and comes back, every device reconnects, no acked telemetry is lost,
and the report has the rows (``n/a`` for a transport without telemetry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main

pytestmark = pytest.mark.timeout(60)


def test_storm_and_drain_tiny(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "w"
    # keepalive 1 s: a QUIC device declares the silent (killed) controller dead after 3 s
    assert (
        main(
            [
                "run",
                "storm",
                "--transport",
                "quic",
                "--agents",
                "3",
                "--procs",
                "1",
                "--keepalive",
                "1",
                "--out",
                str(out),
                "--work",
                str(work),
                "--no-report",
                "--set",
                "before=50",
                "--set",
                "during=100",
                "--set",
                "back_timeout=30",
            ]
        )
        == 0
    )
    storm = json.loads((out / "storm-quic.json").read_text())["runs"][0]
    assert not storm.get("error"), storm.get("error")
    assert storm["summary"]["devices_back"] == 3
    tele = storm["storm"]["telemetry"]
    assert tele["acked"] == 3 * 150 and tele["lost"] == 0 and tele["not_stored"] == 0

    assert (
        main(
            [
                "compare",
                "--scenario",
                "drain",
                "--transports",
                "quic,h2-push",
                "--agents",
                "3",
                "--procs",
                "1",
                "--out",
                str(out),
                "--work",
                str(work),
                "--set",
                "backlog=200",
            ]
        )
        == 0
    )
    runs = {
        r["label"]: r for r in json.loads((out / "drain-quic-h2-push.json").read_text())["runs"]
    }
    assert runs["quic"]["summary"]["devices_drained"] == 3, runs["quic"].get("error")
    assert runs["quic"]["summary"]["telemetry_not_stored"] == 0
    assert runs["h2-push"]["summary"] == {"telemetry_note": "n/a (no telemetry path)"}
    report = (out / "report.md").read_text()
    assert "n/a (no telemetry path)" in report and "| quic |" in report
