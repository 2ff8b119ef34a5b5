"""``margo-bench quic-stacks`` end to end on a few rounds: both stacks complete a real
handshake and the push exchange, and the report says what each device side spent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.quic_stacks import STACKS, main


def test_both_stacks_run_the_push_exchange_and_are_reported(tmp_path: Path) -> None:
    assert main(["--rounds", "30", "--runs", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quic-stacks.json").read_text())
    assert {x["stack"] for x in data["runs"][0]} == set(STACKS)
    for stack in STACKS:
        s = data["summary"][stack]
        # a push and a status ack arrive, an answer and a status leave, every round
        assert s["received_per_round"] >= 2 and s["sent_per_round"] >= 1, (stack, s)
        assert s["cpu_us_per_round"] > 0
    report = (tmp_path / "quic-stacks.md").read_text()
    assert "margo-bench quic-stacks --rounds 30" in report and "| qh3 |" in report


def test_bad_counts_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--rounds", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--rounds and --runs must be at least 1" in capsys.readouterr().err
