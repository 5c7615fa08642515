"""The strategies benchmark's step-time pairing, and (slow) one small end-to-end run of it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_strategies():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_strategies

        yield bench_strategies
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_step_ratios_pair_each_step_with_full_step_of_same_cycle(bench_strategies):
    # the machine slows down 2x halfway: paired ratios stay 0.5, a ratio of medians would not
    times = {"full": [1.0, 1.0, 2.0, 2.0, 2.0], "lora": [0.5, 0.5, 1.0, 1.0, 1.0]}
    figures = bench_strategies.step_time_figures(times, batch=8)
    assert figures["full"]["step_time_vs_full"] == 1.0
    assert figures["lora"]["step_time_vs_full"] == 0.5
    assert figures["lora"]["step_vs_full_iqr"] == "0.50-0.50"
    assert figures["lora"]["step_s"] == 1.0
    assert figures["lora"]["cells_per_s"] == 8.0


def test_step_ratio_quartiles_show_the_spread(bench_strategies):
    times = {"full": [1.0] * 5, "prefix": [0.8, 0.9, 1.0, 1.1, 1.2]}
    figures = bench_strategies.step_time_figures(times, batch=8)["prefix"]
    assert figures["step_time_vs_full"] == pytest.approx(1.0)
    assert (figures["step_vs_full_q1"], figures["step_vs_full_q3"]) == pytest.approx((0.9, 1.1))


@pytest.mark.slow
def test_strategies_benchmark_writes_a_table_with_ratios_to_full(tmp_path):
    env = {**os.environ, "SCPEFT_BENCH_RESULTS": str(tmp_path)}
    command = [sys.executable, str(BENCHMARKS / "bench_strategies.py"), "--sizes", "small"]
    command += ["--strategies", "full", "head_only", "--cycles", "2", "--memory-rounds", "1", "--memory-steps", "2"]
    subprocess.run(command, check=True, env=env, capture_output=True, text=True, timeout=600)
    with (tmp_path / "strategies_small.csv").open() as handle:
        rows = {row["strategy"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"full", "head_only"}
    assert float(rows["full"]["step_time_vs_full"]) == 1.0
    assert float(rows["full"]["memory_vs_full"]) == 1.0
    head = rows["head_only"]
    assert len(head["step_times_s"].split()) == 2
    assert int(head["trainable_params"]) < int(rows["full"]["trainable_params"])
    assert float(head["live_peak_mb"]) > 0 and float(head["step_s"]) > 0
    assert "step_vs_full_iqr" in (tmp_path / "strategies_small.md").read_text()
