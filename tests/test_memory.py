"""What the cache holds: each layer only what it can attend to (issue 12's storage contract).

These are exact byte counts, not timings: the byte targets of ``benchmarks/memory.py`` on the tiny models.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

import sinkcache
from sinkcache import CACHE_KWARG, SinkCache, enable_streaming
from sinkcache.cache import SinkLayer, SlidingLayer
from tests.zoo import ARCHITECTURES, tiny_model

WINDOW, SINKS = 256, 4


def attn_for(arch: str) -> str:
    return "eager" if arch in ("gemma2", "gpt_oss") else "sdpa"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_sliding_layers_are_those_transformers_bounds(arch):
    """The layers sinkcache reads as sliding are exactly those transformers' DynamicCache(config=...) bounds, with
    the same windows (the zoo has no chunked-attention model, which DynamicCache bounds too)."""
    model = tiny_model(arch, attn_for(arch))
    enable_streaming(model, 64, SINKS)  # below phi3-longrope's 128-token limit
    ours = sinkcache.patch._ENABLED[model].rope.sliding_windows
    theirs = [layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None
              for layer in DynamicCache(config=model.config).layers]
    assert list(ours) == theirs


def token_bytes(model: torch.nn.Module) -> int:
    """Bytes of one token's key and value in one layer (batch 1)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * torch.finfo(model.dtype).bits // 8


def stream(model, cache, chunks, seed=0):
    torch.manual_seed(seed)
    tokens = torch.randint(3, model.config.vocab_size, (1, sum(chunks)))
    start = 0
    with torch.no_grad():
        for n in chunks:
            model(input_ids=tokens[:, start : start + n], **{CACHE_KWARG: cache})
            start += n


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt_oss", "mistral"])
def test_steady_state_holds_what_the_layers_can_attend_to(arch):
    """Past the window, with one token per call, a full-attention layer holds W + 1 slots and a sliding layer its
    window; the whole cache (sinks' copies and tables included) is within 5 % of the bytes of the tokens the layers
    can attend to, and below transformers' DynamicCache(config=...) once it holds more than a few extra tokens."""
    overrides = {"gemma3": dict(sliding_window=64), "mistral": dict(sliding_window=64)}.get(arch, {})
    model = tiny_model(arch, attn_for(arch), layers=4, **overrides)
    enable_streaming(model, WINDOW, SINKS)
    windows = sinkcache.patch._ENABLED[model].rope.sliding_windows
    cache = SinkCache(WINDOW, SINKS)
    stream(model, cache, [WINDOW - 1] + [1] * 40)
    reference = sum(min(WINDOW + 1, w or WINDOW + 1) for w in windows) * token_bytes(model)
    assert cache.nbytes <= 1.05 * reference, (cache.nbytes, reference)
    for layer, window in zip(cache.layers, windows):
        if isinstance(layer, SlidingLayer):
            assert window is not None and layer.keys.shape[-2] == window
        else:
            assert isinstance(layer, SinkLayer) and layer.kv.shape[-2] == WINDOW + 1
    dynamic = DynamicCache(config=model.config)
    stream(model, dynamic, [WINDOW + 40])
    assert cache.nbytes < sum(t.untyped_storage().nbytes() for layer in dynamic.layers
                              for t in (layer.keys, layer.values))


def test_a_chunk_takes_its_room_for_that_call_only():
    """A chunk of n tokens may hold W + n slots while it runs (as DynamicCache does); the next one-token call gives
    the room back, on full-attention and sliding layers alike."""
    model = tiny_model("qwen2", layers=2)
    enable_streaming(model, 32, SINKS)
    cache = SinkCache(32, SINKS)
    stream(model, cache, [40, 1, 1])
    steady = cache.nbytes
    stream(model, cache, [50], seed=1)
    full, sliding = cache.layers
    assert isinstance(full, SinkLayer) and isinstance(sliding, SlidingLayer)
    assert full.kv.shape[-2] >= 32 + 50 and cache.nbytes > steady
    stream(model, cache, [1], seed=2)
    assert full.kv.shape[-2] == 33 and sliding.keys.shape[-2] == 6 and cache.nbytes == steady


def test_static_shapes_keep_every_layer_in_the_full_layout():
    """Static shapes attend to a whole buffer through one mask: every layer keeps the full layout there."""
    model = tiny_model("qwen2", layers=2)
    enable_streaming(model, 32, SINKS, static_shapes=True)
    cache = SinkCache(32, SINKS, static_shapes=True)
    stream(model, cache, [40, 1])
    assert all(isinstance(layer, SinkLayer) for layer in cache.layers)
