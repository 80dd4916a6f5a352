"""benchmarks/serve.py's quick mode runs end to end (a tiny model, sinkcache's two servers on loopback) and writes
complete results; with sessions the later turns feed only their new tokens, without them the whole conversation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve.py"


def test_quick_benchmark_writes_results_and_plot(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "serve.png").stat().st_size > 0
    sessions, baseline = results["runs"]["sessions"], results["runs"]["no-sessions"]
    for run_ in (sessions, baseline):
        assert [row["turn"] for row in run_["per_turn"]] == list(range(1, 7))
        assert all(row["ttft_s"] > 0 and row["memory_mib"] > 0 for row in run_["per_turn"])
    assert sessions["summary"]["continued_share"] == 1.0 and baseline["summary"]["continued_share"] == 0.0
    for with_, without in zip(sessions["per_turn"][1:], baseline["per_turn"][1:]):
        # (the prompts' sizes may differ by a token or two: a new session tokenizes the whole text, and an earlier
        # reply can tokenize differently from the ids it was generated as)
        assert without["fed_tokens"] == without["prompt_tokens"]
        assert with_["fed_tokens"] < with_["prompt_tokens"] / 2


# A parent that starts a child holding 160 MiB; the child exits when the parent's pipe to it closes.
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import sys; held = bytearray(160 << 20); sys.stdin.read()"],
                         stdin=subprocess.PIPE)
child.wait()
"""


def test_server_memory_counts_the_processes_it_started() -> None:
    # transformers serve runs its model in a child process: the benchmark must count that child's memory.
    import time

    from sinkcache.serve.launch import Server

    server = Server([sys.executable, "-c", PARENT])
    server.process = subprocess.Popen(server.command)
    try:
        deadline = time.monotonic() + 60
        while server.tree_pss_bytes() < 150 << 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert 150 << 20 <= server.tree_pss_bytes() < 300 << 20  # the two processes, not the whole machine
        assert server.rss_bytes() < 100 << 20  # the parent alone holds little of it
    finally:
        server.stop()
    with pytest.raises(RuntimeError, match="exited"):  # not a silent 0 for a server that is gone
        server.tree_pss_bytes()
