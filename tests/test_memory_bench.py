"""The memory benchmark's quick mode runs end to end, and its targets are computed from the curves (and can fail)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory.py"
sys.path.insert(0, str(SCRIPT.parent))
import memory  # noqa: E402 - the benchmark's module, from its folder


def test_quick_run_writes_results_table_and_plot(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "memory.png").stat().st_size > 0
    assert "| config | W |" in (tmp_path / "table.md").read_text()
    assert [(row["config"], row["window_length"]) for row in results["cases"]] == [  # every config at 64, then 128
        (name, w) for w in (64, 128) for name in ("llama", "mistral", "gemma3", "gpt_oss")]
    for row in results["cases"]:
        windows = results["configs"][row["config"]]["layer_windows"]
        assert row["attendable_bytes"] > 0 and row["steady_nbytes_max"] >= row["steady_nbytes_min"] > 0
        assert row["dynamic_monotone"] and row["dynamic_points"][-1][0] == row["tokens"]
        if all(w is None for w in windows):  # full attention only: DynamicCache keeps every token
            assert row["dynamic_bytes_at_end"] > row["dynamic_bytes_just_past_window"]
        if all(w is not None for w in windows):  # sliding only: DynamicCache is bounded
            assert row["dynamic_bytes_at_end"] == row["dynamic_bytes_just_past_window"]
        assert all(isinstance(met, bool) for met in row["targets"].values())


def test_targets_follow_the_measurements() -> None:
    plan = memory.Plan(window=8, past=8, prefill_chunk=4, span=2, every=True)
    geometry = memory.Geometry(token_bytes=[10, 10], windows=[None, 4])  # attendable: 10 * 9 + 10 * 4 = 130
    dynamic = [(9, 130), (12, 160), (16, 200)]
    good = memory.compare([(t, 130) for t in range(9, 17)], dynamic, plan, geometry)
    assert good["steady_ratio_to_attendable"] == 1.0 and all(good["targets"].values())
    too_big = memory.compare([(t, 150) for t in range(9, 17)], dynamic, plan, geometry)
    assert not any(too_big["targets"].values())  # 150 > 1.05 * 130, and above DynamicCache's 130 at 9..11 tokens
    assert too_big["worst_ratio_at_tokens"] == 9 and too_big["below_dynamic_from_tokens"] == 12
    assert good["below_dynamic_from_tokens"] == 9
    assert memory.below_dynamic_from([(9, 150), (16, 250)], dynamic, 8) is None  # above at the end: never
    shrinking = memory.compare([(t, 130) for t in range(9, 17)], [(9, 130), (12, 120), (16, 200)], plan, geometry)
    assert not shrinking["dynamic_monotone"] and not shrinking["targets"][
        "never above DynamicCache(config=...) past the window"]


def test_bad_input_is_one_line_and_exit_2() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "4"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--sizes must be > 5" in run.stderr
