"""``benchmarks/gpu_check.py --device cpu --quick``: the GPU script's code paths, small, on CPU (no CUDA needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_cpu_quick_mode_passes_and_writes_results(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "**Oracle**" in (tmp_path / "RESULTS.md").read_text()
    oracle = results["oracle"]
    assert oracle["passed"] == 12 and not oracle["failed"]  # 3 architectures x 2 dtypes x 2 layouts
    for case in oracle["cases"].values():
        assert case["max_abs_difference"] <= case["tolerance"] < case["control_difference"]
    assert "skipped" in results["tensor_parallel"]  # no CUDA here, and --tp-cpu was not given
    cases = results["throughput"]["cases"]
    assert [(c["window_length"], c["batch"]) for c in cases] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    for case in cases:
        for label in ("SinkCache", "SinkCache(static_shapes)", "DynamicCache", "StaticCache"):
            assert case["eager"][label]["tokens_per_s"] > 0 and case["memory"][label]["cache_bytes"] > 0
        assert case["compiled"] == {"skipped": "--no-compile"}


def test_bad_device_is_one_line_and_exit_2() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "tpu"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--device" in run.stderr
