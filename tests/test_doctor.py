"""``python -m sinkcache doctor``: the versions, the self-check's verdict in one line, and its exit status."""

from __future__ import annotations

import subprocess
import sys

import transformers

from sinkcache import compat, doctor, selfcheck


def test_tiny_model_streams_exactly(capsys):
    assert doctor.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "torch", "transformers", "accelerate"):
        assert f"\n{name} " in out
    assert f"transformers  {transformers.__version__}" in out and compat.VERIFIED_TRANSFORMERS in out
    assert out.strip().splitlines()[-1].startswith("OK: this install streams exactly")


def test_a_failing_self_check_is_one_line_and_exit_1(capsys, monkeypatch):
    def broken(model, keyword, static_shapes=False):
        selfcheck._refuse(model, "call 3 of 8 (5 tokens, before any eviction) gave logits up to 9 away")

    monkeypatch.setattr(selfcheck, "check", broken)
    assert doctor.main(["--tiny", "--static-shapes"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("FAIL: sinkcache's self-check failed") and "call 3 of 8" in last


def test_bad_input_is_exit_2_with_one_line():
    done = subprocess.run([sys.executable, "-m", "sinkcache", "doctor", "--threads", "0"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.strip() == (
        "python -m sinkcache doctor: error: --threads must be at least 1, got 0.")
    done = subprocess.run([sys.executable, "-m", "sinkcache", "doctor", "--model", "./no/such/folder"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "No model folder ./no/such/folder" in done.stderr
