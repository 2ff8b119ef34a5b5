"""``margo-bench compare`` at a tiny size: every transport runs the push scenario for real
(controller, Mosquitto, device processes on loopback) and the report has a row for each."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_compare_fails_when_a_transport_produced_no_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every run of the transport failed (here: an unknown bench link): non-zero, and the
    message says what failed and where its logs are (the work directory is kept)."""
    rc = main(
        [
            "compare",
            "--scenario",
            "push",
            "--transports",
            "quic",
            "--agents",
            "2",
            "--procs",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--set",
            "link=carrier-pigeon",
            "--no-report",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "quic: no result in 1 run(s)" in err and "carrier-pigeon" in err
    assert "read the controller's log in each of:" in err


def test_a_scenario_without_the_bench_extra_says_which_extra(tmp_path: Path) -> None:
    """A scenario whose plotting needs matplotlib, on an install without it: one line naming
    the extra, no traceback."""
    (tmp_path / "plots_something.py").write_text(
        "def main(argv):\n    import matplotlib  # noqa: F401\n    return 0\n"
    )
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import bench.cli as cli\n"
        "cli.SCENARIOS['plots'] = ('plots_something', 'a scenario that plots')\n"
        "sys.exit(cli.main(['plots']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "pip install 'margo-stream[bench]'" in r.stderr and "'matplotlib'" in r.stderr
    assert "Traceback" not in r.stderr
