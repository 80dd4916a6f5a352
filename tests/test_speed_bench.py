"""The speed benchmark's quick mode runs end to end and writes complete results (no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_benchmark_writes_results_and_plot(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "speed.png").stat().st_size > 0

    assert results["machine"]["cpu"] and results["machine"]["torch_threads"] >= 1
    assert [row["window_length"] for row in results["decode"]] == [64, 128]
    for row in results["decode"]:
        assert row["model"] == "tiny" and len(row["per_run"]) == row["runs"] >= 3
        for method in ("sink", "dynamic", "recompute"):
            assert all(positive(row[method][key]) for key in ("ms_mean", "ms_median", "tokens_per_s")), method
        for ratio in ("throughput_ratio_sink_vs_dynamic", "median_ratio_sink_vs_dynamic", "speedup_vs_recompute"):
            assert positive(row[ratio]), ratio
        assert positive(row["memory"]["sink_cache_bytes"]) and positive(row["memory"]["dynamic_cache_bytes"])

    stream = results["stream"]
    for key in ("latency_ms_early", "latency_ms_late", "latency_ratio_late_vs_early", "throughput_ratio_late_vs_early"):
        assert positive(stream[key]), key
    memory = stream["memory"]
    assert positive(memory["cache_bytes_min"]) and memory["cache_bytes_min"] == memory["cache_bytes_max"]
    if memory["peak_bytes_at_end"] is not None:  # resident memory is read from /proc (Linux)
        assert positive(memory["peak_bytes_at_memory_from"]) and math.isfinite(memory["peak_growth"])
    assert stream["curve"][-1]["tokens"] == stream["tokens"]
    assert all(positive(point["latency_ms"]) and positive(point["cache_bytes"]) for point in stream["curve"])
    dynamic = results["dynamic_stream"]
    assert dynamic[-1]["cache_bytes"] > dynamic[0]["cache_bytes"]  # the contrast: DynamicCache keeps every token

    assert results["targets"] and all(isinstance(t["met"], bool) for t in results["targets"].values())


def test_step_cost_profile_prints_a_row_per_size() -> None:
    script = SCRIPT.parent / "step_cost.py"
    run = subprocess.run([sys.executable, str(script), "--sizes", "32", "64", "--steps", "40"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "W" not in line]
    # the split, the bounds (without the sinks' rotation, kernels only), then each cache after the other kind and
    # after its own
    assert [row[0].strip() for row in rows] == ["32", "64"] * 3
    for row in rows[:2]:
        step_sink, step_dynamic = (float(x) for x in row[1].split("/"))
        assert step_sink > 0 and step_dynamic > 0 and float(row[3]) > 0
    for row in rows[2:4]:
        steps = [float(x) for x in row[1].split("/")]
        ratios = [float(x) for x in row[2].split("/")]
        assert len(steps) == 4 and all(step > 0 for step in steps)
        # throughput against DynamicCache: its step time over each other's (the printed times are rounded to 1 µs)
        assert ratios == pytest.approx([steps[0] / step for step in steps[1:]], abs=0.02)
    for row in rows[4:]:
        crossed, own = ([float(x) for x in cell.split("/")] for cell in row[1:3])
        ratios = [float(x) for x in row[3].split("/")]
        assert len(crossed) == len(own) == 2 and all(step > 0 for step in crossed + own)
        assert ratios == pytest.approx([crossed[0] / crossed[1], own[0] / own[1]], abs=0.02)
