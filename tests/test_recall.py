"""The recall probe (``sinkcache.recall``): planted facts line up with their questions, every regime answers alike
while the stream fits the cache, and the command line writes its outputs or refuses bad input in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from sinkcache.recall import (
    accuracy_by_distance,
    accuracy_cached,
    answer_trial,
    build_trial,
    make_cache,
    probe,
    trial_tokens,
)
from sinkcache.recall import main as recall_main
from tests.test_perplexity import one_error_line, tiny_folder  # noqa: F401  (tiny_folder is a fixture)
from tests.zoo import tiny_model


class Digits:
    """A character-level tokenizer (id = byte + 3 - 32, in the tiny model's 97 ids): every text has tokens."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(max(ord(c) - 29, 3), 96) for c in text]}


def test_the_planted_answer_is_in_the_stream_where_the_line_ends():
    trial = build_trial(Digits(), num_lines=5, seed=1)
    for line in range(5):
        answer, end = trial.answers[line], trial.line_ends[line]
        assert trial.stream[end - len(answer):end] == answer and len(answer) == 5  # " dddd"
    assert build_trial(Digits(), 5, 1) == trial and build_trial(Digits(), 5, 2).answers != trial.answers


def test_every_regime_answers_alike_while_the_stream_fits_the_cache():
    result = probe(tiny_model("llama"), Digits(), num_lines=4, window_length=512, trials=1, questions=4,
                   chunk_size=7)
    by_regime: dict[str, list] = {}
    for record in result["records"]:
        assert record["cached"]
        by_regime.setdefault(record["regime"], []).append(record["predicted"])
    assert by_regime["dense"] == by_regime["window"] == by_regime["sink"]
    assert result["lines_asked"] == [0, 1, 2, 3]


class Counter:
    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n


def test_the_progress_bar_counts_every_token_run():
    trial = build_trial(Digits(), num_lines=6, seed=3)
    counter = Counter()
    answer_trial(tiny_model("llama"), trial, [0, 5], make_cache("dense", 64, 4), chunk_size=7, progress=counter)
    assert counter.n == trial_tokens(trial, [0, 5]) == len(trial.stream) + 2 * (len(trial.questions[0]) + 4)


def test_facts_beyond_the_window_are_marked_evicted():
    result = probe(tiny_model("llama"), Digits(), num_lines=12, window_length=48, num_sink_tokens=4, trials=1,
                   questions=6, chunk_size=8, regimes=("window", "sink"))
    for record in result["records"]:
        kept = 48 if record["regime"] == "window" else 44
        assert record["cached"] == (record["distance"] + 5 <= kept)
    assert {r["cached"] for r in result["records"]} == {True, False}
    accuracy = accuracy_cached(result["records"])
    assert set(accuracy) == {"window", "sink"} and all(0 <= v <= 1 for a in accuracy.values() for v in a.values())
    bins = accuracy_by_distance(result["records"], 48)["sink"]
    assert sum(b["asked"] for b in bins) == 6 and all(b["stop"] - b["start"] == 24 for b in bins)


def test_command_end_to_end(tiny_folder, tmp_path):  # noqa: F811  (the fixture)
    if not AutoTokenizer.from_pretrained(tiny_folder)("line 1: the passcode is")["input_ids"]:
        pytest.skip("the tiny tokenizer drops the probe's words")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sinkcache", "recall", "--model", str(tiny_folder), "--num-lines", "10",
               "--window-length", "32", "--trials", "1", "--questions", "4", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "recall.json").read_text())
    assert set(summary["accuracy"]) == {"dense", "window", "sink"} and len(summary["records"]) == 12
    assert (out / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "with the fact cached" in done.stdout
    assert "recall: 100%" in done.stderr  # the progress bar ran to its end


@pytest.mark.parametrize("argv, expected", [
    (["--regimes", "dense,bogus"], "unknown regime"),
    (["--num-lines", "0"], "--num-lines must be at least 1"),
    (["--num-sink-tokens", "300", "--window-length", "256"], "--num-sink-tokens must be >= 0 and below"),
    (["--model", "/nonexistent/model-folder"], "No model folder /nonexistent/model-folder"),
])
def test_bad_input_is_one_line_and_status_2(argv, expected, capsys, tmp_path):
    assert recall_main([*argv, "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert expected in one_error_line(captured.err) and captured.out == ""
