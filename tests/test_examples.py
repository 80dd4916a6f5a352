"""Every example's short mode, run as a user would (a subprocess on the offline default model), checked on its output.

Loading the model takes most of each run, so the runs the selected tests need all start together when the first
of them is needed, each on one thread: on a small machine that beats one two-thread process after another.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from sinkcache import offline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT_S = 420  # per example, generous for a loaded 2-core machine; a typical run takes 30-90 s
CHAT_WINDOW, ENDLESS_WINDOW, DOCUMENT_WINDOW = 64, 48, 128

# name -> (script, arguments, stdin)
RUNS: dict[str, tuple[str, list[str], str | None]] = {
    "chat": ("streaming_chat.py", ["--turns", "6", "--max-new-tokens", "8", "--window", str(CHAT_WINDOW),
                                   "--report-every", "2"], None),
    "chat-stdin": ("streaming_chat.py", ["--max-new-tokens", "6", "--window", str(CHAT_WINDOW)],
                   "Hello!\n\nWhat is Python?\n/quit\nnever read\n"),
    "endless": ("endless_generation.py", ["--tokens", "150", "--window", str(ENDLESS_WINDOW),
                                          "--report-every", "50"], None),
    "document": ("long_document.py", ["--tokens", "2000", "--window", str(DOCUMENT_WINDOW), "--chunk", "32",
                                      "--report-every", "512", "--max-new-tokens", "8"], None),
    "pipeline": ("pipeline.py", ["--window", "128", "--max-new-tokens", "8"], None),
}


def _default_model_missing() -> str | None:
    try:
        offline.smollm2_gguf()
        import gguf  # noqa: F401
    except (offline.SetupError, ImportError) as error:
        return f"the examples need the offline default model: {error}"
    return None


_MISSING = _default_model_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def _run(script: str, arguments: list[str], stdin: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *arguments], input=stdin or "",
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=EXAMPLES.parent)


@pytest.fixture(scope="module")
def started(request: pytest.FixtureRequest) -> Iterator[dict[str, Future]]:
    """Start, all at once, the example runs that the selected tests ask for (their ``example`` parameter)."""
    wanted = {item.callspec.params["example"] for item in request.session.items
              if "example" in getattr(getattr(item, "callspec", None), "params", {})}
    with ThreadPoolExecutor(max_workers=max(1, len(wanted))) as pool:
        yield {name: pool.submit(_run, *RUNS[name]) for name in wanted}


@pytest.fixture
def example(request: pytest.FixtureRequest, started: dict[str, Future]) -> subprocess.CompletedProcess:
    """The finished run named by the test's ``example`` parameter, checked to have exited cleanly."""
    result = started[request.param].result()
    assert result.returncode == 0, f"{RUNS[request.param][0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def uses(name: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("example", [name], indirect=True)


def fields(line: str) -> dict[str, float]:
    """The ``key=number`` pairs of a report line."""
    return {key: float(value) for key, value in re.findall(r"(\w+)=([-\d.e+]+|nan|inf)", line)}


def lines(output: str, tag: str) -> list[dict[str, float]]:
    return [fields(line) for line in output.splitlines() if line.startswith(tag)]


def assert_flat_memory(reports: list[dict[str, float]], window: int) -> None:
    """Once the stream is longer than the window: the cache keeps ``window`` tokens and never grows past what it held
    at the first report (a shorter last chunk may give room back), and the process does not grow (a little
    allocator noise allowed)."""
    full = [r for r in reports if r["streamed"] > window]
    assert len(full) >= 2, f"the stream never outgrew the window enough to check: {reports}"
    assert all(r["kept"] == window for r in full)
    assert all(r["slots"] <= full[0]["slots"] and r["cache_bytes"] <= full[0]["cache_bytes"] for r in full), full
    assert full[-1]["rss_mib"] - full[0]["rss_mib"] < 64, full


@uses("chat")
def test_streaming_chat_scripted(example):
    output = example.stdout
    speeds = lines(output, "[speed]")
    assert [s["turn"] for s in speeds] == list(range(1, 7))
    assert all(1 <= s["generated"] <= 8 and s["tokens_per_s"] > 0 for s in speeds)
    assert len(re.findall(r"^assistant: \S", output, re.MULTILINE)) == 6
    memory = lines(output, "[memory]")
    assert [m["turn"] for m in memory] == [2, 4, 6]
    assert_flat_memory(memory, CHAT_WINDOW)
    assert "[done] turns=6" in output


@uses("chat-stdin")
def test_streaming_chat_interactive_reads_stdin_until_quit(example):
    output = example.stdout
    assert [s["turn"] for s in lines(output, "[speed]")] == [1, 2]  # the blank line is skipped, /quit stops
    assert "[turn 1] user: Hello!" in output and "[turn 2] user: What is Python?" in output
    assert "never read" not in output


@uses("endless")
def test_endless_generation(example):
    stats = lines(example.stderr, "[stats]")
    assert [s["generated"] for s in stats] == [50, 100, 150]
    assert all(s["tokens_per_s"] > 0 for s in stats)
    assert_flat_memory(stats, ENDLESS_WINDOW)
    (done,) = lines(example.stderr, "[done]")
    assert done["generated"] == 150 and done["streamed"] > 150
    text = example.stdout.split("\n", 1)[1]  # after the "loaded ..." line: the generated text only
    assert len(text.split()) > 40, f"the streamer printed too little text: {text!r}"


@uses("document")
def test_long_document(example):
    output = example.stdout
    reads = lines(output, "[read]")
    assert [r["tokens"] for r in reads] == [512, 1024, 1536, 1999]
    # The model keeps predicting the text well after the window has been passed many times (a vocabulary of 49,152
    # tokens means a perplexity of 49,152 for a model that predicts nothing).
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] < 60 for r in reads), reads
    assert_flat_memory(reads, DOCUMENT_WINDOW)
    (continuation,) = lines(output, "[continuation]")
    assert continuation["generated"] == 8 and continuation["streamed"] == 2000 + 8 - 1
    assert output.split("--- the model continues ---\n", 1)[1].strip()


@uses("pipeline")
def test_pipeline(example):
    output = example.stdout
    assert len(re.findall(r"^\[pipeline\] ", output, re.MULTILINE)) == 3
    answers = re.findall(r"^  -> (.*)$", output, re.MULTILINE)  # repr() of each generated text
    assert len(answers) == 4 and all(len(answer) > 2 for answer in answers), output
    assert "[done] pipeline calls=3" in output


def test_examples_run_on_one_thread_unless_told(monkeypatch):
    """torch's default (every core) read long_document.py at 8-11 tokens/s on shared cores, one thread at 73."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import _common

    parser = argparse.ArgumentParser()
    _common.add_model_arguments(parser)
    assert parser.parse_args([]).threads == 1 and parser.parse_args(["--threads", "0"]).threads == 0


@uses("endless")
def test_the_thread_count_is_reported(example):
    assert "; 1 torch threads)" in example.stdout.splitlines()[0]
