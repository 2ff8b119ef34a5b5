"""``margo-bench compare`` at a tiny size: every transport runs the push scenario for real
(controller, Mosquitto, device processes on loopback) and the report has a row for each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.transports.mqtt import mosquitto_path

pytestmark = pytest.mark.timeout(120)


def test_compare_push_tiny(tmp_path: Path) -> None:
    transports = ["quic", "rest-poll@0.5", "h2-push"]
    if mosquitto_path() is not None:
        transports.append("mqtt")
    out = tmp_path / "out"
    rc = main(
        [
            "compare",
            "--scenario",
            "push",
            "--transports",
            ",".join(transports),
            "--agents",
            "4",
            "--procs",
            "1",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "w"),
            "--set",
            "samples=4",
            "--set",
            "gap=0.05",
        ]
    )
    assert rc == 0
    data = json.loads(next(out.glob("push-*.json")).read_text())
    labels = [r["label"] for r in data["runs"]]
    assert labels == [
        "quic",
        "rest-poll 0.5 s",
        "h2-push",
        *(["mqtt"] if "mqtt" in transports else []),
    ]
    assert len(data["machine"]["loadavg_at_end"]) == 3
    for run in data["runs"]:
        assert run["connect"]["connected"] == 4 and run["connect"]["registered"] == 4
        assert run["summary"]["fanout_missing"] == 0, run["label"]
        assert run["push"]["latency_ms"]["n"] == 4, run["label"]
        assert len(run["load"]["before"]) == 3
    report = (out / "report.md").read_text()
    for label in labels:
        assert f"| {label} |" in report
    assert (out / f"{next(out.glob('push-*.json')).stem}-latency.png").stat().st_size > 1000
    if "mqtt" not in transports:
        pytest.skip("mosquitto is not installed: mqtt row not checked (apt-get install mosquitto)")
