"""Reliability: long soaks, random streams against the oracle, low-precision drift, and refusals of bad input.

The full 1,000,000-token soak is slow; it runs with ``pytest -m slow tests/test_reliability.py``, with
``SINKCACHE_SOAK_TOKENS=N pytest tests/test_reliability.py -k full_soak`` for another length, or as a script:
``python -m tests.test_reliability --tokens 1000000``.

How the end of a long stream is checked cheaply
-----------------------------------------------
The oracle of ``tests/oracle.py`` replays the whole stream in one forward pass, so it cannot follow a million
tokens. But a token's logits depend on little of the stream:

* one layer: keys and values are a function of the token and its position only (no context), so the logits of
  token ``t`` are those of a fresh forward over exactly the tokens it sees, at positions ``0..L``
  (``recompute_logits``), however deep into the stream ``t`` is;
* ``n`` layers: layer ``l``'s keys of token ``u`` depend on what ``u`` saw, recursively, ``n - 1`` hops deep.
  Every hop reaches back at most ``window - sinks`` tokens (plus the sinks, which only ever saw each other). So if
  the stream's last ``n * (window - sinks) + K`` tokens are fed one at a time, the last ``K`` of them have exactly
  the logits they would have in the short *virtual* stream ``sinks + those tokens`` fed one at a time, which the
  oracle handles: everything those logits depend on saw the same tokens at the same distances in both streams.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from sinkcache import CACHE_KWARG, NotEnabledError, SinkCache, UnsupportedModelError, enable_streaming, is_streaming
from sinkcache.rotary import RopeSpec
from tests.oracle import contract_visible, oracle_logits, recompute_logits
from tests.zoo import COMMON, tiny_model

TOLERANCE = 1e-4  # float32 logits
COMPARED = 40  # one-token steps compared with the oracle at the end of a soak
PATTERNS = {  # chunk sizes of a soak, cycled
    "small": (1, 1, 3, 1, 7, 1, 1, 16, 2, 1, 5, 1),
    "mixed": (1, 1, 3, 1, 7, 1, 1, 16, 2, 1, 5, 1, 70, 1, 1, 33, 1),  # 33 and 70: longer than the slack / window
}


# ---- soak -------------------------------------------------------------------------------------------------
@dataclass
class SoakResult:
    tokens: int
    calls: int
    seconds: float
    worst: float  # worst |logit difference| against the oracle over the last COMPARED steps
    max_position: int  # largest position id the model was given
    buffers: dict[int, set[tuple[int, int]]] = field(default_factory=dict)  # chunk size -> {(slots, bytes)}
    block_growth: int = 0  # Python memory blocks allocated between the middle and the end of the stream
    nonfinite_calls: int = 0


def cache_bytes(cache: SinkCache) -> int:
    """Bytes of every tensor the cache holds (key/value buffers and the sinks' unrotated copies)."""
    names = ("keys", "values", "sink_keys", "sink_values")
    tensors = (getattr(layer, name) for layer in cache.layers for name in names)
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


class MaxPosition:
    """A forward pre-hook that keeps the largest position id given to the model."""

    def __init__(self) -> None:
        self.value = -1

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.value = max(self.value, int(kwargs["position_ids"].max()))


def python_blocks() -> int:
    gc.collect()
    return sys.getallocatedblocks()


def soak(model, total: int, window: int, sinks: int, pattern: tuple[int, ...], seed: int = 0) -> SoakResult:
    """Stream ``total`` random tokens in chunks cycling through ``pattern``, then one token at a time for the tail
    that the check needs (see the module docstring), and measure everything the soak tests assert on."""
    layers = model.config.num_hidden_layers
    tail = layers * (window - sinks) + COMPARED
    tokens = torch.randint(3, model.config.vocab_size, (total,), generator=torch.Generator().manual_seed(seed))
    enable_streaming(model, window, sinks)
    positions = MaxPosition()  # registered after enable_streaming's hook, so it sees the positions that one set
    recorder = model.base_model.register_forward_pre_hook(positions, with_kwargs=True)
    cache = SinkCache(window, sinks)
    result = SoakResult(tokens=total, calls=0, seconds=0.0, worst=0.0, max_position=0, buffers=defaultdict(set))
    bulk, fed, middle_blocks = total - tail, 0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for n in itertools.cycle(pattern):
            n = min(n, bulk - fed)
            if n == 0:
                break
            logits = model(input_ids=tokens[None, fed : fed + n], **{CACHE_KWARG: cache}).logits
            result.nonfinite_calls += not bool(torch.isfinite(logits).all())
            fed, result.calls = fed + n, result.calls + 1
            if fed - n >= window:  # warmed up: the window was full before the call, which evicts
                result.buffers[n].add((cache.layers[0].keys.shape[-2], cache_bytes(cache)))
            if fed - n < bulk // 2 <= fed:
                middle_blocks = python_blocks()
        result.block_growth = python_blocks() - middle_blocks
        got = torch.stack([model(input_ids=tokens[None, t : t + 1], **{CACHE_KWARG: cache}).logits[0, -1]
                           for t in range(bulk, total)])[-COMPARED:]
    result.seconds = time.perf_counter() - start
    result.max_position = positions.value
    recorder.remove()

    if layers == 1:
        want = torch.stack([recompute_logits(model, tokens, visible_at(t, window, sinks))
                            for t in range(total - COMPARED, total)])
    else:
        want = virtual_stream_logits(model, tokens, window, sinks, tail)
    result.worst = (got - want).abs().max().item()
    result.nonfinite_calls += not bool(torch.isfinite(got).all())
    return result


def visible_at(t: int, window: int, sinks: int) -> list[int]:
    """What a one-token step at stream index ``t >= window`` attends to: the sinks, the last window tokens, itself."""
    return list(range(sinks)) + list(range(t - (window - sinks), t + 1))


def virtual_stream_logits(model, tokens: torch.Tensor, window: int, sinks: int, tail: int) -> torch.Tensor:
    """The oracle's logits for the last COMPARED tokens, from the virtual stream ``sinks + last tail tokens``."""
    virtual = torch.cat([tokens[:sinks], tokens[-tail:]])
    return oracle_logits(model, virtual, contract_visible([1] * len(virtual), window, sinks), sinks)[-COMPARED:]


def assert_healthy(result: SoakResult, window: int, pattern: tuple[int, ...]) -> None:
    assert result.nonfinite_calls == 0, f"{result.nonfinite_calls} calls produced NaN/inf logits"
    assert result.worst < TOLERANCE, f"positions drifted: worst logit difference {result.worst:.2e}"
    # Positions are re-based inside the cache: they stay small however long the stream (float32 RoPE stays exact).
    assert result.max_position < 2 * window + max(pattern), result.max_position
    steady = result.buffers[1]
    assert len(steady) == 1, f"the buffer changed size during the soak: {steady}"
    (slots, nbytes), = steady
    assert slots == window + 1  # one-token calls roll in place in the window plus the new token's slot
    for n, seen in result.buffers.items():
        # a chunk of n tokens takes the room of the window plus itself for that call; the next one-token call (or
        # a shorter chunk) gives it back
        assert {s for s, _ in seen} == {window + n}, f"chunks of {n} tokens held {seen} (steady: {steady})"
    # A leak of even one Python object per call would show as thousands of blocks.
    assert result.block_growth < 1000, f"{result.block_growth} Python memory blocks leaked"


@pytest.mark.parametrize(("layers", "window", "sinks", "pattern"), [
    (1, 32, 4, "small"),  # checked by the plain recomputation
    (2, 24, 2, "mixed"),  # checked by the virtual-stream oracle; long chunks grow and shrink the buffer
])
def test_soak(layers, window, sinks, pattern):
    model = tiny_model("llama", layers=layers)
    result = soak(model, 20_000, window, sinks, PATTERNS[pattern])
    assert_healthy(result, window, PATTERNS[pattern])


def test_virtual_stream_needs_its_whole_tail():
    """The virtual-stream check on a stream the full oracle can follow too: it matches with the tail the module
    docstring derives, and does not with one hop (window - sinks tokens) less, so that tail length is needed."""
    model = tiny_model("llama", layers=2)
    window, sinks, total = 24, 2, 400
    enable_streaming(model, window, sinks)
    tokens = torch.randint(3, 97, (total,), generator=torch.Generator().manual_seed(0))
    cache = SinkCache(window, sinks)
    with torch.no_grad():
        got = torch.cat([model(input_ids=tokens[None, t : t + 1], **{CACHE_KWARG: cache}).logits[0]
                         for t in range(total)])
    full_tail = 2 * (window - sinks) + COMPARED
    assert (got[-COMPARED:] - virtual_stream_logits(model, tokens, window, sinks, full_tail)).abs().max() < TOLERANCE
    short_tail = full_tail - (window - sinks)
    assert (got[-COMPARED:] - virtual_stream_logits(model, tokens, window, sinks, short_tail)).abs().max() > 1e-2


def soak_tokens() -> int:
    return int(os.environ.get("SINKCACHE_SOAK_TOKENS", "1000000"))


@pytest.mark.slow
@pytest.mark.parametrize("layers", [1, 2])
def test_full_soak(layers, request):
    if "slow" not in request.config.getoption("markexpr") and "SINKCACHE_SOAK_TOKENS" not in os.environ:
        pytest.skip("the 1,000,000-token soak takes minutes: run it with -m slow (or SINKCACHE_SOAK_TOKENS=N)")
    window, sinks, pattern = 64, 4, PATTERNS["mixed"]
    result = soak(tiny_model("llama", layers=layers), soak_tokens(), window, sinks, pattern)
    print(f"\nsoak: {result.tokens:,} tokens, {layers} layer(s), {result.calls:,} calls in {result.seconds:.0f} s; "
          f"worst tail difference {result.worst:.2e}, Python block growth {result.block_growth}")
    assert_healthy(result, window, pattern)


# ---- random streams against the oracle ---------------------------------------------------------------------
@functools.cache
def property_model(arch: str):
    return tiny_model(arch)


@st.composite
def streams(draw):
    """A random cache setting, chunking, batch and left padding (each row keeps at least one real token)."""
    window = draw(st.integers(2, 20))
    sinks = draw(st.integers(0, min(4, window - 1)))
    chunks = draw(st.lists(st.integers(1, 12), min_size=1, max_size=10))
    pads = draw(st.lists(st.integers(0, min(6, sum(chunks) - 1)), min_size=1, max_size=3))
    arch = draw(st.sampled_from(["llama", "mistral", "gemma3"]))  # plain, sliding window, sliding + full layers
    return arch, window, sinks, chunks, pads, draw(st.integers(0, 2**16))


def row_chunks(chunks: list[int], pad: int) -> list[int]:
    """The calls a left-padded row sees as its own stream: the padding columns removed, empty calls dropped."""
    out, skipped = [], 0
    for n in chunks:
        take = n - min(n, pad - skipped)
        skipped += n - take
        if take:
            out.append(take)
    return out


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_random_streams_match_oracle(stream):
    arch, window, sinks, chunks, pads, seed = stream
    model = property_model(arch)
    enable_streaming(model, window, sinks)
    total = sum(chunks)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, model.config.vocab_size, (len(pads), total), generator=generator)
    mask = torch.ones_like(tokens)
    for row, pad in enumerate(pads):
        tokens[row, :pad], mask[row, :pad] = model.config.pad_token_id, 0
    cache, logits, start = SinkCache(window, sinks), [], 0
    with torch.no_grad():
        for n in chunks:
            out = model(input_ids=tokens[:, start : start + n], attention_mask=mask[:, : start + n],
                        **{CACHE_KWARG: cache})
            logits.append(out.logits)
            start += n
    got = torch.cat(logits, dim=1)
    for row, pad in enumerate(pads):
        want = oracle_logits(model, tokens[row, pad:], contract_visible(row_chunks(chunks, pad), window, sinks), sinks)
        worst = (got[row, pad:] - want).abs().max().item()
        assert worst < TOLERANCE, f"row {row} (padding {pad}): {worst:.2e}"


# ---- low precision: no drift after 100,000 evictions ---------------------------------------------------------
HEADS, HEAD_DIM, EVICTIONS = 2, 32, 100_000
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)


def fresh_keys(unrotated: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE in float64 (independent of sinkcache.rotary): ``unrotated`` [..., seq, dim] at ``positions``."""
    angles = positions.to(torch.float64)[:, None] * INV_FREQ
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = unrotated.double().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def by_token(keys: torch.Tensor, values: torch.Tensor, stream_values: torch.Tensor):
    """Which stream tokens a call attended to, and their keys and values in stream order.

    The cache may hold its window in ring order (rolling in place), so each returned slot is identified by its value
    vector, stored bit-exact: ``stream_values`` ``[tokens, heads, width]`` are every token's values (all distinct).
    Returns ``(token indices, keys, values)``, the tensors ``[heads, slots, dim]`` reordered.
    """
    found = []
    for slot in values[0].transpose(0, 1):  # one slot's [heads, width] at a time: the stream may be long
        hits = (stream_values == slot).flatten(1).all(1).nonzero()[:, 0]
        assert len(hits) == 1, "a returned slot holds no token's values, or several"
        found.append(int(hits[0]))
    tokens = torch.tensor(found)
    order = tokens.argsort()
    return tokens[order].tolist(), keys[0][:, order], values[0][:, order]


def rounding_error(stored: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """Worst ``|stored - exact|`` per key vector, in units of the dtype's epsilon times the vector's largest entry."""
    scale = exact.abs().amax(dim=-1, keepdim=True) * torch.finfo(dtype).eps
    return ((stored.double() - exact) / scale).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keys_do_not_drift(dtype):
    """Drive one cache layer as a model would (keys rotated at the positions the cache assigns, cast once) through
    100,000 evictions. The sinks' and the window's stored keys must still be within 2 epsilons (of each key's
    largest entry) of the exact rotation of the same unrotated keys: a freshly rotated key cast once is within half
    an epsilon, so the cache may add a rounding or two, never one per eviction. Values must be bit-exact."""
    window, sinks = 64, 4
    cache = SinkCache(window, sinks)
    rope = RopeSpec((INV_FREQ.float(),), max_position=None, model_id=0)
    total = window + EVICTIONS
    unrotated = torch.randn(total, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    values = (unrotated * 0.5).to(dtype)

    def step(fed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One forward call's work for this layer; returns what the call attends to and its last position."""
        position_ids, _ = cache.begin_step(1, n, None, rope)
        keys = fresh_keys(unrotated[fed : fed + n].transpose(0, 1), position_ids[0]).to(dtype)[None]
        stored_keys, stored_values = cache.update(keys, values[fed : fed + n].transpose(0, 1)[None], 0)
        return stored_keys, stored_values, int(position_ids[0, -1])

    fed = 0
    for n in itertools.cycle((1, 1, 1, 5, 1, 16, 1, 3)):
        n = min(n, total - 1 - fed)
        if n == 0:
            break
        step(fed, n)
        fed += n
    # a last one-token call attends to the sinks, the window and itself, at consecutive positions
    stored_keys, stored_values, query_position = step(fed, 1)
    seen = visible_at(total - 1, window, sinks)
    tokens, stored_keys, stored_values = by_token(stored_keys, stored_values, values)
    assert tokens == seen and len(seen) == window + 1
    exact = fresh_keys(unrotated[seen].transpose(0, 1), torch.arange(query_position - window, query_position + 1))
    error = rounding_error(stored_keys, exact, dtype)
    assert error <= 2.0, f"stored keys are {error:.2f} epsilons from freshly rotated ones"
    assert torch.equal(stored_values, values[seen].transpose(0, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rerotating_every_step_in_low_precision_drifts(dtype):
    """Negative control: rotating cached keys back by one position per eviction in the model's dtype (the naive
    scheme) accumulates one rounding per step and leaves the bound above far behind."""
    sinks, steps = 4, 10_000
    unrotated = torch.randn(HEADS, sinks, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    keys = fresh_keys(unrotated, torch.arange(steps, steps + sinks)).to(dtype)
    for _ in range(steps):
        keys = fresh_keys(keys, torch.full((sinks,), -1)).to(dtype)
    assert rounding_error(keys, fresh_keys(unrotated, torch.arange(sinks)), dtype) > 20.0  # 10x the bound


@pytest.mark.parametrize("static", [False, True], ids=["views", "static"])
def test_layers_of_other_shapes_and_value_widths(static):
    """Two layers driven as a model would, with value widths (16 and 48) other than the key width (32), so that they
    form two storage groups, each narrower than its buffer on one side. Through chunks that compact, grow the
    buffer and re-base positions, every one-token call must attend to exactly the contract's tokens: keys rotated
    to consecutive positions ending at the query's, values unchanged."""
    window, sinks, total = 24, 4, 1000
    cache = SinkCache(window, sinks, static_shapes=static)
    rope = RopeSpec((INV_FREQ.float(),) * 2, max_position=None, model_id=0)
    generator = torch.Generator().manual_seed(0)
    unrotated = torch.randn(total, HEADS, HEAD_DIM, generator=generator)
    values = [torch.randn(total, HEADS, width, generator=generator) for width in (16, 48)]
    fed, checked, rolled = 0, 0, 0
    for n in itertools.cycle((1, 1, 5, 1, 16, 1, 3, 1, 1, 30)):
        n = min(n, total - fed)
        if n == 0:
            break
        position_ids, slot_mask = cache.begin_step(1, n, None, rope)
        keys = fresh_keys(unrotated[fed : fed + n].transpose(0, 1), position_ids[0]).float()[None]
        for layer, layer_values in enumerate(values):
            stored_keys, stored_values = cache.update(keys, layer_values[fed : fed + n].transpose(0, 1)[None], layer)
            if n > 1:
                continue
            if static:  # the whole buffer comes back; the slot mask (after its leading column) says what is live
                live = slot_mask[0, 1:].nonzero()[:, 0]
                stored_keys, stored_values = stored_keys[..., live, :], stored_values[..., live, :]
            seen = visible_at(fed, window, sinks) if fed >= window else list(range(fed + 1))
            tokens, stored_keys, stored_values = by_token(stored_keys, stored_values, layer_values)
            assert tokens == seen, f"token {fed}, layer {layer}"
            query = int(position_ids[0, -1])
            exact = fresh_keys(unrotated[seen].transpose(0, 1), torch.arange(query - len(seen) + 1, query + 1))
            assert stored_keys.shape == (HEADS, len(seen), HEAD_DIM)
            assert (stored_keys.double() - exact).abs().max() < 1e-5, f"keys, token {fed}, layer {layer}"
            assert torch.equal(stored_values, layer_values[seen].transpose(0, 1)), f"values, token {fed}"
            rolled += cache.ring is not None
            checked += 1
        fed += n
    assert len(cache.groups) == 2 and checked > 150
    assert rolled > 50 if not static else rolled == 0  # both layouts of the default addressing were checked


# ---- bad input: clear errors that name the fix ---------------------------------------------------------------
@pytest.mark.parametrize(("window", "sinks", "error", "fix"), [
    (4, 4, ValueError, "Increase window_length"),
    (3, 5, ValueError, "Increase window_length"),
    (0, 0, ValueError, "Increase window_length"),
    (-8, 2, ValueError, r"window_length \(-8\) must be larger than num_sink_tokens \(2\).*at least num_sink"),
    (-5, 0, ValueError, r"at least num_sink_tokens \+ 1"),
    (8, -1, ValueError, "num_sink_tokens must be >= 0"),
    (8.0, 2, TypeError, "must be an int"),
    (8, 2.5, TypeError, "must be an int"),
    ("8", 2, TypeError, "must be an int"),
    (True, 0, TypeError, "must be an int"),
])
def test_invalid_sizes(window, sinks, error, fix):
    """Each message names what the user called, and states the bound that holds (window_length > num_sink_tokens)."""
    with pytest.raises(error, match=fix) as caught:
        SinkCache(window, sinks)
    assert str(caught.value).startswith("SinkCache ")
    model = tiny_model("llama", layers=1)
    with pytest.raises(error, match=fix) as caught:
        enable_streaming(model, window, sinks)
    assert str(caught.value).startswith("enable_streaming ")
    assert not is_streaming(model)


@pytest.mark.parametrize("chunk", [0, -4, 2.5, True])
def test_invalid_prefill_chunk_size(chunk):
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match="prefill_chunk_size must be a positive int"):
        enable_streaming(model, 16, 4, prefill_chunk_size=chunk)
    assert not is_streaming(model)


def feed(model, cache: SinkCache, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, **{CACHE_KWARG: cache}, **kwargs).logits


def test_cache_reused_with_another_batch_size_needs_reset():
    model = enable_streaming(tiny_model("llama"), 16, 4)
    cache = SinkCache(16, 4)
    feed(model, cache, torch.randint(3, 97, (2, 5)))
    with pytest.raises(ValueError, match=r"batch size 2, but got batch size 3.*cache\.reset\(\)"):
        feed(model, cache, torch.randint(3, 97, (3, 1)))


def test_cache_reused_with_another_model():
    first, second = (enable_streaming(tiny_model("llama", seed=seed), 16, 4) for seed in (0, 1))
    cache = SinkCache(16, 4)
    feed(first, cache, torch.randint(3, 97, (1, 5)))
    with pytest.raises(ValueError, match="create one SinkCache per model"):
        feed(second, cache, torch.randint(3, 97, (1, 1)))


def test_learned_positions_are_refused():
    model = tiny_model("gpt2")
    with pytest.raises(UnsupportedModelError, match="learned absolute positions.*supports RoPE models only"):
        enable_streaming(model)
    assert not is_streaming(model) and "generate" not in model.__dict__


def test_cache_without_enable_streaming_is_refused():
    with pytest.raises(NotEnabledError, match=r"Call sinkcache\.enable_streaming\(model\)"):
        feed(tiny_model("llama"), SinkCache(16, 4), torch.randint(3, 97, (1, 5)))


def test_crop_and_assisted_decoding_are_refused():
    model = enable_streaming(tiny_model("llama"), 16, 4)
    cache = SinkCache(16, 4)
    feed(model, cache, torch.randint(3, 97, (1, 5)))
    with pytest.raises(NotImplementedError, match="need a DynamicCache"):
        cache.crop(2)
    prompt = torch.randint(3, 97, (1, 5))
    # transformers refuses a cache without is_croppable itself (5.4 on); earlier releases call crop(), which refuses
    refused = "cache that can be cropped|need a DynamicCache"
    with pytest.raises((ValueError, NotImplementedError), match=refused):
        model.generate(prompt, assistant_model=tiny_model("llama", seed=1), max_new_tokens=5, do_sample=False)
    with pytest.raises((ValueError, NotImplementedError), match=refused):
        model.generate(prompt, prompt_lookup_num_tokens=2, max_new_tokens=5, do_sample=False)


def test_right_padding_and_prepared_masks_are_refused():
    model = enable_streaming(tiny_model("llama"), 16, 4)
    tokens = torch.randint(3, 97, (2, 6))
    right_padded = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="left padding only.*Pad each sequence on the left"):
        feed(model, SinkCache(16, 4), tokens, attention_mask=right_padded)
    with pytest.raises(ValueError, match="needs a 2D attention_mask.*Pass the usual padding mask"):
        feed(model, SinkCache(16, 4), tokens, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool))


def test_window_beyond_length_dependent_rope_is_refused():
    config = AutoConfig.for_model("llama", **{**COMMON, "num_hidden_layers": 1, "rope_parameters": dict(
        rope_type="dynamic", factor=2.0, rope_theta=10000.0)})  # frequencies fixed up to 512 positions only
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match=r"window_length \(600\) must be below 512"):
        enable_streaming(model, 600, 4)
    enable_streaming(model, 500, 4)
    with pytest.raises(ValueError, match="Use a smaller window_length or feed fewer tokens per call"):
        feed(model, SinkCache(500, 4), torch.randint(3, 97, (1, 20)))


def interrupt(model, layer: int) -> None:
    """Make the next forward pass stop with KeyboardInterrupt (a Ctrl-C) just before decoder layer ``layer``."""
    def stop(module, args):
        handle.remove()
        raise KeyboardInterrupt

    handle = model.model.layers[layer].register_forward_pre_hook(stop)


def test_interrupted_forward_is_detected_and_reset_recovers():
    model = enable_streaming(tiny_model("llama"), 16, 4)
    tokens = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    cache = SinkCache(16, 4)
    feed(model, cache, tokens[:, :10])
    interrupt(model, 1)
    with pytest.raises(KeyboardInterrupt):
        feed(model, cache, tokens[:, 10:11])
    with pytest.raises(RuntimeError, match=r"did not finish; call cache\.reset\(\)"):
        feed(model, cache, tokens[:, 11:12])
    cache.reset()
    assert torch.equal(feed(model, cache, tokens), feed(model, SinkCache(16, 4), tokens))


def test_interrupted_first_forward_is_detected():
    """A first forward interrupted before every layer stored its keys must not leave zero keys behind silently."""
    model = enable_streaming(tiny_model("llama"), 16, 4)
    tokens = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    cache = SinkCache(16, 4)
    interrupt(model, 1)  # layer 0 stores the prompt, layer 1 never sees it
    with pytest.raises(KeyboardInterrupt):
        feed(model, cache, tokens[:, :10])
    with pytest.raises(RuntimeError, match=r"call cache\.reset\(\)"):
        feed(model, cache, tokens[:, 10:11])


def prompt_then_steps(model, cache: SinkCache, tokens: torch.Tensor, prompt: int = 7) -> torch.Tensor:
    """Logits of a ``prompt``-token call followed by one call per remaining token."""
    steps = [feed(model, cache, tokens[:, t : t + 1]) for t in range(prompt, tokens.shape[1])]
    return torch.cat([feed(model, cache, tokens[:, :prompt]), *steps], dim=1)


def test_reset_makes_a_cache_reusable():
    """A reset cache gives exactly what a fresh one gives, also for another batch size and other chunking."""
    model = enable_streaming(tiny_model("llama"), 16, 4)
    generator = torch.Generator().manual_seed(4)
    first = torch.randint(3, 97, (2, 50), generator=generator)
    second = torch.randint(3, 97, (3, 40), generator=generator)
    cache = SinkCache(16, 4)
    for start in range(0, 50, 5):
        feed(model, cache, first[:, start : start + 5])
    cache.reset()
    assert cache.get_seq_length() == 0
    assert torch.equal(prompt_then_steps(model, cache, second), prompt_then_steps(model, SinkCache(16, 4), second))
    out = model.generate(second[:1, :9], cache=SinkCache(16, 4), max_new_tokens=30, do_sample=False)
    cache.reset()
    assert torch.equal(model.generate(second[:1, :9], cache=cache, max_new_tokens=30, do_sample=False), out)


def main() -> None:
    parser = argparse.ArgumentParser(description="The long soak, outside pytest.")
    parser.add_argument("--tokens", type=int, default=soak_tokens())
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for layers in args.layers:
        result = soak(tiny_model("llama", layers=layers), args.tokens, 64, 4, PATTERNS["mixed"])
        print(f"{layers} layer(s): {result.tokens:,} tokens in {result.calls:,} calls, {result.seconds:.0f} s "
              f"({result.tokens / result.seconds:,.0f} tokens/s); worst tail difference {result.worst:.2e}; "
              f"max position {result.max_position}; buffers {dict(result.buffers)}; "
              f"Python block growth {result.block_growth}", flush=True)
        assert_healthy(result, 64, PATTERNS["mixed"])
    print("soak passed")


if __name__ == "__main__":
    main()
