"""The perplexity benchmark's sink-count sweep, its recommendation, the attention its sinks receive inside the
sink regime (``CachedSinkMeter``), and meaningless sinks (``--sink-prefix``).

Tiny random models (tests/zoo.py) and the saved tiny Llama of tests/test_perplexity.py, no downloads.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from sinkcache import SinkCache, SinkMeasureError, enable_streaming, offline
from sinkcache.perplexity import Settings, main, recommend_sink_count, run, stream_nll, write_plots
from sinkcache.sinks import CachedSinkMeter
from tests.test_perplexity import CLI, one_error_line, tiny_folder  # noqa: F401  (tiny_folder is a fixture)
from tests.zoo import tiny_model


def test_recommendation_is_the_smallest_count_within_tolerance_of_the_best():
    sweep = {0: 20.0, 1: 10.3, 2: 10.1, 4: 10.0, 8: 10.05}
    assert recommend_sink_count(sweep, 0.02) == 2  # 10.3 > 1.02 * 10.0 = 10.2 >= 10.1
    assert recommend_sink_count(sweep, 0.05) == 1
    assert recommend_sink_count(sweep, 0.0) == 4
    assert recommend_sink_count({8: 5.0, 0: 5.0}) == 0  # ties: the smaller count
    with pytest.raises(ValueError):
        recommend_sink_count({})


def test_sweep_runs_the_sink_regime_once_per_count(tiny_folder, tmp_path):  # noqa: F811  (the fixture)
    settings = Settings(model=str(tiny_folder), num_tokens=60, window_length=16, sink_counts=(0, 1, 2, 4),
                        regimes=("window", "sink"), segment_size=10, output=str(tmp_path), progress=False)
    summary = run(settings)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(summary))
    assert write_plots(summary, tmp_path) == [tmp_path / "perplexity.png", tmp_path / "sink_sweep.png"]
    assert (tmp_path / "sink_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(summary["regimes"]) == ["window", "sink-0", "sink-1", "sink-2", "sink-4"]
    regimes = summary["regimes"]
    assert regimes["sink-2"]["context"] == "2 sinks + last 14 tokens (SinkCache)"
    assert all(regimes[name]["tokens_scored"] == 60 for name in regimes)
    # 0 sinks is window attention, token for token; before the first eviction every count sees the same tokens
    assert regimes["sink-0"]["perplexity"] == regimes["window"]["perplexity"]
    first = regimes["sink-0"]["segments"][0]["perplexity"]
    assert all(math.isclose(regimes[f"sink-{n}"]["segments"][0]["perplexity"], first, rel_tol=1e-5) for n in (1, 2, 4))
    assert regimes["sink-4"]["perplexity"] != regimes["sink-0"]["perplexity"]

    sweep = summary["sweep"]
    assert sweep["counts"] == [0, 1, 2, 4] and sweep["window_length"] == 16 and sweep["tolerance"] == 0.02
    assert sweep["perplexity"] == [regimes[f"sink-{n}"]["perplexity"] for n in (0, 1, 2, 4)]
    assert sweep["recommended_num_sink_tokens"] == recommend_sink_count(dict(zip(sweep["counts"],
                                                                                 sweep["perplexity"])), 0.02)
    assert sweep["perplexity"][sweep["counts"].index(sweep["best_num_sink_tokens"])] == min(sweep["perplexity"])
    shares, layers = sweep["sink_attention_share"], sweep["sink_attention_share_per_layer"]
    assert shares[0] == 0.0 and layers[0] is None and all(0 < share <= 1 for share in shares[1:])
    # every layer has the same number of heads: the mean over layers is the mean over all heads
    assert all(math.isclose(sum(per_layer) / len(per_layer), share) for per_layer, share in zip(layers[1:], shares[1:]))
    assert "in the sink regime" in sweep["sink_attention_method"]
    measured = regimes["sink-2"]["sink_attention"]
    assert (measured["steps_sampled"], measured["first_step"], measured["last_step"]) == (3, 17, 49)  # 17 + 16 k
    assert measured["layers_without_sinks"] == [] and "sink_attention" not in regimes["window"]
    # the meter runs on a copy of the cache: the perplexity is that of a run without it, exactly
    alone = run(replace(settings, sink_counts=(), num_sink_tokens=2, regimes=("sink",)))
    assert alone["regimes"]["sink"]["perplexity"] == regimes["sink-2"]["perplexity"]


def test_a_single_count_writes_what_it_wrote_before_sweeps(tiny_folder, tmp_path):  # noqa: F811  (the fixture)
    summary = run(Settings(model=str(tiny_folder), num_tokens=30, window_length=16, regimes=("window", "sink"),
                           output=str(tmp_path), progress=False))
    assert "sweep" not in summary and write_plots(summary, tmp_path) == [tmp_path / "perplexity.png"]
    assert not (tmp_path / "sink_sweep.png").exists()
    assert not {"sink_counts", "tolerance", "sink_prefix"} & set(summary["config"])
    assert "sink_prefix_token_ids" not in summary and list(summary["regimes"]) == ["window", "sink"]


def test_sweep_from_the_command_line(tiny_folder, tmp_path):  # noqa: F811  (the fixture)
    text = tmp_path / "stream.txt"
    text.write_text(offline.default_text()[:5_000])
    command = [sys.executable, str(CLI), "--model", str(tiny_folder), "--text", str(text), "--num-tokens", "40",
               "--window-length", "12", "--num-sink-tokens", "0,2,4", "--regimes", "sink", "--tolerance", "0.5",
               "--output", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["config"]["sink_counts"] == [0, 2, 4] and summary["sweep"]["tolerance"] == 0.5
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[2:5] == ["sink-0", "sink-2", "sink-4"] and rows[-3:] == ["0", "2", "4"]
    recommended = summary["sweep"]["recommended_num_sink_tokens"]
    assert f"recommended --num-sink-tokens {recommended}: the smallest count within 50% of the best" in done.stdout


@pytest.mark.parametrize("argv, expected", [
    (["--num-sink-tokens", "0,x"], "--num-sink-tokens '0,x' is not a count"),
    (["--num-sink-tokens", "0,1"], "pass --regimes with sink and without recompute"),
    (["--num-sink-tokens", "1,1", "--regimes", "sink"], "lists a count twice"),
    (["--num-sink-tokens=-1,2", "--regimes", "sink"], "--num-sink-tokens -1 is out of range"),
    (["--num-sink-tokens", "0,16", "--window-length", "16", "--regimes", "sink"], "must be larger than"),
    (["--num-sink-tokens", "0,4", "--regimes", "sink", "--sink-prefix", "x"], "--sink-prefix takes a single"),
    (["--num-sink-tokens", "0", "--sink-prefix", "x"], "--sink-prefix needs a non-empty text"),
    (["--num-sink-tokens", "0,4", "--regimes", "sink", "--tolerance", "1.5"], "--tolerance must be in [0, 1)"),
    (["--num-sink-tokens", "0,4", "--regimes", "sink", "--sink-attention-every", "0"],
     "--sink-attention-every must be at least 1"),
])
def test_bad_sweep_input_is_one_line_and_status_2(argv, expected, capsys, tmp_path):
    assert main([*argv, "--output", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert expected in one_error_line(captured.err) and captured.out == ""


# ---- the sinks' attention inside the cache --------------------------------------------------------------------
WINDOW, SINKS = 16, 2


def metered(model, tokens, every: int, chunk: int = 1, cache=None):
    """Stream ``tokens`` through a SinkCache with a CachedSinkMeter; the NLL and what it measured."""
    enable_streaming(model, WINDOW, SINKS)
    meter = CachedSinkMeter(model, tokens[:SINKS], WINDOW, WINDOW + 1, every)
    nll = stream_nll(model, tokens, SinkCache(WINDOW, SINKS) if cache is None else cache, chunk, observe=meter)
    return nll, meter.result()


def re_encoded_share(model, tokens, step: int) -> torch.Tensor:
    """``[layers, heads]``: the share on the sinks of the last query of a fresh eager forward over what the cache
    keeps at ``step`` (the sinks, the most recent tokens, the token itself), at positions 0.. in order."""
    kept = torch.cat([tokens[:SINKS], tokens[step - (WINDOW - SINKS):step + 1]])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=kept[None], output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation("sdpa")
    return torch.stack([weights[0, :, -1, :SINKS].sum(-1) for weights in attentions]).double()


@pytest.mark.parametrize("name, chunk", [("llama", 1), ("llama", 4), ("phi3", 1), ("mistral", 1), ("gemma3", 1)])
def test_the_sinks_share_in_the_cache_equals_a_re_encode_of_what_it_keeps(name, chunk):
    """A 1-layer model streams exactly like a fresh forward over what the cache keeps (test_perplexity.py), so the
    query's weights on the sinks must be those of that forward: llama rolls its cache in place (the sinks are not
    the first slots), phi3 rotates half of each head, mistral and gemma3 have a sliding window that hides the
    sinks (share 0 in both computations). With chunks of 4 the sampled steps are the chunk starts."""
    model = tiny_model(name, layers=1)
    tokens = torch.randint(3, 97, (61,), generator=torch.Generator().manual_seed(1))
    _, measured = metered(model, tokens, every=5, chunk=chunk)
    # every 5th token from 17 on; with chunks of 4, the first chunk start at or after each of them
    assert measured.steps == ([17, 22, 27, 32, 37, 42, 47, 52, 57] if chunk == 1 else [20, 24, 28, 32, 40, 44, 48, 52])
    expected = torch.stack([re_encoded_share(model, tokens, step) for step in measured.steps])
    assert measured.per_step.shape == expected.shape == (len(measured.steps), 1, 4)
    assert (measured.per_step - expected).abs().max() < 1e-5
    if name in ("llama", "phi3"):  # sinks in sight: a share worth comparing
        assert expected.mean() > 0.05


def test_layer_0_of_a_deeper_model_equals_the_re_encode():
    """Past layer 0 a cached key was computed with the context of its own time, not of a re-encode; layer 0's keys,
    queries and weights are context-free, so there the two must agree, and layer 1 is read as well."""
    model = tiny_model("llama", layers=3)
    tokens = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(2))
    _, measured = metered(model, tokens, every=7)
    assert measured.steps == [17, 24, 31, 38] and measured.per_step.shape == (4, 3, 4)
    expected = torch.stack([re_encoded_share(model, tokens, step) for step in measured.steps])
    assert (measured.per_step[:, 0] - expected[:, 0]).abs().max() < 1e-5
    assert (measured.per_step[:, 1:] - expected[:, 1:]).abs().max() > 1e-3  # deeper layers: the regime, not a re-encode


def test_the_meter_leaves_the_stream_unchanged():
    model = tiny_model("llama")
    tokens = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(3))
    nll, _ = metered(model, tokens, every=3)
    assert torch.equal(nll, stream_nll(model, tokens, SinkCache(WINDOW, SINKS)))


def test_a_cache_without_the_sinks_is_refused():
    """Window attention (no sinks kept) evicts the stream's first tokens: a full-attention layer then attends to no
    key of theirs, which the meter reports instead of a share of 0."""
    model = tiny_model("llama")
    tokens = torch.randint(3, 97, (30,), generator=torch.Generator().manual_seed(4))
    with pytest.raises(SinkMeasureError, match="no key layer 0 attends to at step 17 is a sink's"):
        metered(model, tokens, every=5, cache=SinkCache(WINDOW, 0))


def test_a_model_without_readable_weights_is_scored_without_the_share(tiny_folder, tmp_path, monkeypatch):  # noqa: F811
    """The sweep still scores every count; the share is None with the reason, and the model is left as it was."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)

    def refuse(implementation):
        raise ValueError(f"no attention implementation {implementation} here")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    settings = Settings(num_tokens=40, window_length=12, sink_counts=(0, 2), regimes=("sink",), output=str(tmp_path),
                        progress=False)
    summary = run(settings, model, AutoTokenizer.from_pretrained(tiny_folder))
    assert summary["sweep"]["sink_attention_share"] == [0.0, None]
    failure = summary["regimes"]["sink-2"]["sink_attention"]["failure"]
    assert "cannot switch" in failure and "no attention implementation eager here" in failure
    assert model.config._attn_implementation == "sdpa"


# ---- meaningless sinks -----------------------------------------------------------------------------------------
def test_prefix_tokens_are_the_sinks_and_are_not_scored(tiny_folder, tmp_path):  # noqa: F811  (the fixture)
    """A 1-layer model streams exactly like a fresh forward over what it keeps (test_perplexity.py), so with the
    prefix the sink regime must equal re-computation whose sinks are the prefix tokens, on the same 40 targets."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    text = tmp_path / "stream.txt"
    text.write_text(offline.default_text()[:5_000])

    def summary(prefix):
        return run(Settings(text=str(text), num_tokens=40, window_length=12, num_sink_tokens=2, sink_prefix=prefix,
                            regimes=("dense", "sink", "recompute"), recompute_tokens=40, output=str(tmp_path),
                            progress=False), tiny_model("llama", layers=1), tokenizer)

    prefixed, plain = summary("the"), summary(None)
    the = tokenizer("the", add_special_tokens=False)["input_ids"]
    assert prefixed["sink_prefix_token_ids"] == the * 2 and prefixed["config"]["sink_prefix"] == "the"
    assert all(regime["tokens_scored"] == 40 for regime in prefixed["regimes"].values())
    sink, recompute = (prefixed["regimes"][name]["perplexity"] for name in ("sink", "recompute"))
    assert math.isclose(sink, recompute, rel_tol=1e-5)
    assert not math.isclose(sink, plain["regimes"]["sink"]["perplexity"], rel_tol=1e-3)  # other sinks, other NLL


def test_a_prefix_without_tokens_is_refused(tiny_folder, tmp_path, capsys):  # noqa: F811  (the fixture)
    """'\\n' on the command line is read as a newline, which the tiny word-level tokenizer drops entirely."""
    assert main(["--model", str(tiny_folder), "--num-tokens", "20", "--window-length", "8", "--num-sink-tokens", "2",
                 "--sink-prefix", "\\n", "--output", str(tmp_path)]) == 2
    assert "--sink-prefix '\\n' has no tokens" in one_error_line(capsys.readouterr().err)
