"""``custom_generate/``: transformers' custom-generate contract, run from a local path (a Hub copy runs the same
file), streams exactly as ``enable_streaming`` does and leaves the model as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sinkcache
from sinkcache import CACHE_KWARG, SinkCache, enable_streaming
from tests.zoo import tiny_model

REPOSITORY = str(Path(__file__).resolve().parent.parent)  # the folder that holds custom_generate/generate.py


def prompt() -> torch.Tensor:
    return torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(0))


def test_streams_exactly_as_enable_streaming_and_leaves_the_model_as_it_was():
    model = tiny_model("llama")
    got = model.generate(prompt(), custom_generate=REPOSITORY, trust_remote_code=True, window_length=16,
                         num_sink_tokens=4, max_new_tokens=40, do_sample=False)
    assert not sinkcache.is_streaming(model)
    want = enable_streaming(tiny_model("llama"), 16, 4).generate(prompt(), max_new_tokens=40, do_sample=False)
    assert torch.equal(got, want)
    full = tiny_model("llama").generate(prompt(), max_new_tokens=40, do_sample=False)
    assert not torch.equal(got, full)  # past the window: the cache really evicted (a negative control)


def test_a_passed_sink_cache_continues_and_another_cache_is_refused():
    model = tiny_model("llama")
    cache = SinkCache(16, 4)
    first = model.generate(prompt(), custom_generate=REPOSITORY, trust_remote_code=True, max_new_tokens=10,
                           do_sample=False, **{CACHE_KWARG: cache})
    assert cache.seen == first.shape[1] - 1  # the last generated token is not fed yet
    with pytest.raises(TypeError, match="custom_generate=sinkcache streams with a sinkcache.SinkCache"):
        model.generate(prompt(), custom_generate=REPOSITORY, trust_remote_code=True, max_new_tokens=2,
                       **{CACHE_KWARG: object()})

