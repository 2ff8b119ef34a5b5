"""The figures of ``margo-bench cluster`` (bench/cluster_report.py) from recorded runs."""

from __future__ import annotations

import pytest

from bench.cluster_report import cost_rows, failover_summary, report_blocks, summarize_cost


def test_failover_counts_only_what_follows_the_kill() -> None:
    conns = [
        [0, 0, 1.0, "up"],  # before the kill: on A
        [1, 0, 1.0, "up"],
        [0, 0, 14.0, "down"],  # noticed 4 s after the kill
        [0, 1, 14.5, "up"],
        [1, 0, 16.0, "down"],
        [1, 1, 17.0, "up"],
        [1, 1, 18.0, "down"],  # a later hop does not move its first arrival on B
        [1, 1, 19.0, "up"],
    ]
    held = {"devices_with_newest": 1}
    s = failover_summary(2, 10.0, 17.5, conns, [{"at_s": 0.5, "apply_s": 0.1}], held)
    assert s["all_on_b_api_s"] == pytest.approx(7.5)
    assert s["all_on_b_devices_s"] == pytest.approx(7.0)
    assert s["on_b"] == 2
    assert s["detect_max_s"] == pytest.approx(6.0)
    assert s["rejoin_p50_s"] == pytest.approx(0.75)
    assert s["pushes_lost"] == 1


def test_failover_not_all_on_b_has_no_time() -> None:
    s = failover_summary(2, 0.0, None, [[0, 0, 1.0, "down"], [0, 1, 2.0, "up"]], [], {})
    assert s["all_on_b_api_s"] is None and s["all_on_b_devices_s"] is None
    assert s["pushes_lost"] == 2


def marks(cpu: tuple[float, ...], pg: tuple[float, ...]) -> list[tuple[str, float, float, float]]:
    labels = ("base", "start", "connected", "push", "pushed", "idle", "idled")
    times = (-10.0, 0.0, 5.0, 7.0, 9.0, 11.0, 21.0)
    return list(zip(labels, times, cpu, pg, strict=True))


def run(config: str, cpu: tuple[float, ...]) -> dict[str, object]:
    return {"config": config, "devices": 100, "marks": marks(cpu, (0, 0, 1, 1, 2, 2, 3))}


def test_cost_per_unit_and_ratios() -> None:
    s = summarize_cost(run("pg-1", (9.95, 10.0, 11.0, 11.0, 11.5, 11.5, 11.6)))
    assert s["ctl_handshake_ms"] == pytest.approx(10.0)  # 1 s over 100 handshakes
    assert s["ctl_push_ms"] == pytest.approx(5.0)
    assert s["ctl_idle_us_s"] == pytest.approx(100.0)  # 0.1 s over 10 s and 100 devices
    assert s["ctl_base_ms_s"] == pytest.approx(5.0)  # 0.05 s over 10 s with no device
    assert s["ctl_idle_net_us_s"] == pytest.approx(50.0)  # (10 ms/s - 5 ms/s) / 100
    assert s["pg_idle_us_s"] == pytest.approx(1000.0)
    assert "marks" not in s
    two = summarize_cost(run("pg-2", (-0.08, 0.0, 1.2, 1.2, 1.7, 1.7, 1.8)))
    rows = {r[0]: r[1:] for r in cost_rows([[s, two]])}
    assert rows["pg-2 / pg-1 (controllers)"] == ["1.20", "1.00", "1.00", "1.60", "0.40"]
    assert rows["pg-1 / sqlite-1 (controllers)"] == ["—"] * 5
    assert any("Target" in b for b in report_blocks({"cost": [[s, two]]}))
