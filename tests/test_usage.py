"""Usage patterns outside the happy path: each works exactly or fails with an error that names the fix (issue 11).

Grad mode, inference mode, pickled and deep-copied caches, deep-copied models, ``cache_implementation`` and
``use_cache=False`` in ``generate()``, ``inputs_embeds`` prompts, meta weights, the base class's ``reset`` and
``SinkCache.nbytes``.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

from sinkcache import NotEnabledError, SinkCache, disable_streaming, enable_streaming, is_streaming
from sinkcache.compat import CACHE_KWARG
from tests.zoo import tiny_model

W, S = 16, 4
TOKENS = torch.randint(3, 97, (1, 600), generator=torch.Generator().manual_seed(11))
STATIC = pytest.mark.parametrize("static", [False, True], ids=["views", "static"])


def feed(model, cache: SinkCache, start: int, stop: int, chunk: int = 1, tokens: torch.Tensor = TOKENS):
    """Logits of ``tokens[:, start:stop]`` fed through ``cache`` in calls of ``chunk`` tokens (grad mode as set)."""
    return torch.cat([model(input_ids=tokens[:, i : min(i + chunk, stop)], **{CACHE_KWARG: cache}).logits
                      for i in range(start, stop, chunk)], dim=1)


@torch.no_grad()
def reference(model, static: bool, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """A stream done entirely under no_grad, in the given (start, stop, chunk) spans."""
    cache = SinkCache(W, S, static_shapes=static)
    return torch.cat([feed(model, cache, *span) for span in spans], dim=1)


def greedy(model, prompt, new: int, **kwargs):
    model.generation_config.eos_token_id = None  # a random model may emit "eos" early; we want exactly `new`
    return model.generate(prompt, max_new_tokens=new, do_sample=False, **kwargs)


# ---- 1. grad mode -----------------------------------------------------------------------------------------------
@STATIC
def test_grad_mode_is_refused_at_the_first_call_and_a_frozen_model_streams(static):
    model = enable_streaming(tiny_model("llama"), W, S)
    cache = SinkCache(W, S, static_shapes=static)
    with pytest.raises(RuntimeError, match=r"torch\.no_grad\(\).*torch\.inference_mode\(\)"):
        feed(model, cache, 0, 1)
    assert cache.get_seq_length() == 0 and not cache.layers  # refused before anything was stored or planned
    want = reference(model, static, [(0, 60, 1)])
    with torch.no_grad():  # the refused cache serves the stream as a fresh one would
        assert torch.equal(feed(model, cache, 0, 60), want)
    model.requires_grad_(False)  # keys that need no gradient stream in grad mode, exactly as under no_grad
    assert torch.is_grad_enabled()
    assert torch.equal(feed(model, SinkCache(W, S, static_shapes=static), 0, 60), want)


# ---- 2. inference mode, then outside it -------------------------------------------------------------------------
@STATIC
def test_cache_filled_under_inference_mode_continues_outside_it(static):
    model = enable_streaming(tiny_model("llama"), W, S)
    spans = [(0, 30, 1), (30, 37, 7), (37, 80, 1)]
    cache = SinkCache(W, S, static_shapes=static)
    with torch.inference_mode():
        first = feed(model, cache, 0, 30)
    with torch.no_grad():
        rest = torch.cat([feed(model, cache, *span) for span in spans[1:]], dim=1)
        with torch.inference_mode():  # and back in: normal tensors may be updated in inference mode
            rest = torch.cat([rest, feed(model, cache, 80, 90)], dim=1)
    assert torch.equal(torch.cat([first, rest], dim=1), reference(model, static, spans + [(80, 90, 1)]))


# ---- 3. pickle and deepcopy of a cache mid-stream ---------------------------------------------------------------
@STATIC
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_copied_cache_continues_exactly(static, how):
    """Copies after the first call (the layers own their storage) and past the window (groups, rolling views)."""
    model = enable_streaming(tiny_model("llama"), W, S)
    copy_of = (lambda c: pickle.loads(pickle.dumps(c))) if how == "pickle" else copy.deepcopy
    cache = SinkCache(W, S, static_shapes=static)
    after = [(30, 55, 1), (55, 60, 5), (60, 100, 1)]  # rolling in place, a chunk that unrolls, rolling again
    with torch.no_grad():
        feed(model, cache, 0, 5, chunk=5)
        early = copy_of(cache)
        feed(model, cache, 5, 30)  # past the window: the views and sinks' slots are in use
        twin = copy_of(cache)
        original = torch.cat([feed(model, cache, *span) for span in after], dim=1)
        copied = torch.cat([feed(model, twin, *span) for span in after], dim=1)
        from_early = torch.cat([feed(model, early, 5, 30)] + [feed(model, early, *span) for span in after], dim=1)
    want = reference(model, static, [(0, 5, 5), (5, 30, 1)] + after)
    assert torch.equal(original, copied) and torch.equal(original, want[:, 30:])
    assert torch.equal(from_early, want[:, 5:])
    other = enable_streaming(tiny_model("llama"), W, S)  # the copy still belongs to its model
    with pytest.raises(ValueError, match="another model"), torch.no_grad():
        feed(other, twin, 100, 101)


# ---- 4. deepcopy of an enabled model ----------------------------------------------------------------------------
def sinkcache_hooks(model) -> int:
    return sum(type(hook).__module__ == "sinkcache.patch" for hook in model.model._forward_pre_hooks.values())


def test_deepcopy_of_an_enabled_model_is_cleanly_not_streaming():
    plain = tiny_model("llama")  # the same weights, never enabled
    model = enable_streaming(tiny_model("llama"), W, S)
    prompt = TOKENS[:, :10]
    streamed = greedy(model, prompt, 30)
    twin = copy.deepcopy(model)
    assert not is_streaming(twin)
    assert torch.equal(greedy(twin, prompt, 30), greedy(plain, prompt, 30))  # the copy's own plain generate
    with pytest.raises(NotEnabledError, match="enable_streaming"), torch.no_grad():
        feed(twin, SinkCache(W, S), 0, 1)
    assert torch.equal(greedy(model, prompt, 30), streamed)  # the original keeps streaming

    enable_streaming(twin, W, S)
    assert is_streaming(twin) and sinkcache_hooks(twin) == 1  # the stale hook was replaced, not stacked
    assert torch.equal(greedy(twin, prompt, 30), streamed)
    with torch.no_grad():
        assert torch.equal(feed(twin, SinkCache(W, S), 0, 40), feed(model, SinkCache(W, S), 0, 40))
    disable_streaming(twin)
    assert sinkcache_hooks(twin) == 0 and "generate" not in twin.__dict__

    other = copy.deepcopy(model)  # disable_streaming on a copy that was never enabled cleans up as well
    disable_streaming(other)
    assert sinkcache_hooks(other) == 0 and "generate" not in other.__dict__
    assert is_streaming(model) and torch.equal(greedy(model, prompt, 30), streamed)


# ---- 5. cache_implementation ------------------------------------------------------------------------------------
IMPLEMENTATIONS = [name for name in ("static", "dynamic", "offloaded", "sliding_window", "quantized")
                   if name in ALL_CACHE_IMPLEMENTATIONS]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cache_implementation_per_call_opts_out_of_streaming(implementation):
    """Exactly what a never-enabled model gives, including its error where transformers raises one."""
    plain = tiny_model("llama")
    model = enable_streaming(tiny_model("llama"), W, S)
    prompt = TOKENS[:, :10]  # 10 + 30 tokens: more than the window, so streaming would change the output
    try:
        want = greedy(plain, prompt, 30, cache_implementation=implementation)
    except Exception as error:  # e.g. "quantized" without its backend installed
        with pytest.raises(type(error), match=str(error)[:40].replace("(", r"\(").replace(")", r"\)")):
            greedy(model, prompt, 30, cache_implementation=implementation)
        return
    assert torch.equal(greedy(model, prompt, 30, cache_implementation=implementation), want)
    # a non-SinkCache cache passed per call is the other opt-out
    assert torch.equal(greedy(model, prompt, 30, cache=DynamicCache()), greedy(plain, prompt, 30))


@pytest.mark.parametrize("where", ["model", "passed"])
def test_cache_implementation_in_a_config_is_ignored_with_a_warning(where):
    model = enable_streaming(tiny_model("llama"), W, S)
    prompt = TOKENS[:, :10]
    want = greedy(model, prompt, 30)
    config = copy.deepcopy(model.generation_config)
    config.cache_implementation = "static"
    kwargs = {"generation_config": config} if where == "passed" else {}
    if where == "model":
        model.generation_config = config
    with pytest.warns(UserWarning, match=r"cache_implementation='static'.*ignored.*cache_implementation="):
        got = greedy(model, prompt, 30, **kwargs)
    assert torch.equal(got, want)
    assert config.cache_implementation == "static"  # the user's config object is left as it was
    with pytest.warns(UserWarning, match="ignored"):  # the same with a SinkCache of the caller's
        assert torch.equal(greedy(model, prompt, 30, cache=SinkCache(W, S), **kwargs), want)


# ---- 6. use_cache=False ---------------------------------------------------------------------------------------
def test_use_cache_false_warns_that_streaming_is_off():
    plain = tiny_model("llama")
    model = enable_streaming(tiny_model("llama"), W, S)
    prompt = TOKENS[:, :10]
    with pytest.warns(UserWarning, match=r"use_cache=False.*not stream"):
        got = greedy(model, prompt, 8, use_cache=False)
    assert torch.equal(got, greedy(plain, prompt, 8, use_cache=False))


# ---- 7. inputs_embeds prompts -----------------------------------------------------------------------------------
def test_inputs_embeds_prompt_is_prefilled_in_chunks():
    """As for input_ids: calls of at most the chunk size, and the same logits as the same prompt given as ids."""
    model = enable_streaming(tiny_model("llama"), W, S, prefill_chunk_size=8)
    prompt = TOKENS[:, :43]
    calls: list[int] = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(next(kwargs[name].shape[1] for name in ("inputs_embeds", "input_ids")
                                                       if kwargs.get(name) is not None)), with_kwargs=True)
    kwargs = dict(return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(prompt)
    from_embeds = greedy(model, None, 20, inputs_embeds=embeds, **kwargs)
    handle.remove()
    assert calls == [8] * 5 + [3] + [1] * 19
    from_ids = greedy(model, prompt, 20, **kwargs)
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, 43:])
    assert (torch.cat(from_embeds.logits) - torch.cat(from_ids.logits)).abs().max() < 1e-6

    # A second turn given as embeddings cannot be checked against what the cache consumed (sinkcache.ledger), so
    # generate() refuses it instead of feeding it by count; the cache is left as it was.
    cache = SinkCache(W, S)
    greedy(model, None, 5, inputs_embeds=embeds[:, :20], cache=cache)
    with torch.no_grad():
        turn2 = torch.cat([embeds, model.get_input_embeddings()(TOKENS[:, 43:60])], dim=1)
    assert cache.get_seq_length() == 24
    with pytest.raises(ValueError, match="inputs_embeds, which cannot be compared"):
        greedy(model, None, 5, inputs_embeds=turn2[:, : 24 + 30], cache=cache)
    assert cache.get_seq_length() == 24


# ---- 8. meta weights --------------------------------------------------------------------------------------------
def test_model_with_meta_weights_is_refused():
    from accelerate import init_empty_weights

    config = tiny_model("llama").config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="meta device.*Load the real weights first"):
        enable_streaming(model, W, S)
    assert not is_streaming(model) and "generate" not in model.__dict__


# ---- 9. reset through the base class or a layer -----------------------------------------------------------------
@STATIC
@pytest.mark.parametrize("how", ["Cache.reset", "layer.reset"])
def test_reset_through_the_base_class_or_a_layer_serves_a_new_stream(static, how):
    model = enable_streaming(tiny_model("llama"), W, S)
    cache = SinkCache(W, S, static_shapes=static)
    other = torch.randint(3, 97, (2, 50), generator=torch.Generator().manual_seed(12))  # another batch size too
    with torch.no_grad():
        feed(model, cache, 0, 40)
        Cache.reset(cache) if how == "Cache.reset" else cache.layers[1].reset()
        assert cache.get_seq_length() == 0
        got = feed(model, cache, 0, 50, chunk=3, tokens=other)
        assert torch.equal(got, feed(model, SinkCache(W, S, static_shapes=static), 0, 50, chunk=3, tokens=other))


# ---- 10. nbytes -------------------------------------------------------------------------------------------------
@STATIC
def test_nbytes_is_constant_from_the_second_call_on(static):
    model = enable_streaming(tiny_model("llama"), W, S)
    cache = SinkCache(W, S, static_shapes=static)
    sizes = {}
    with torch.no_grad():
        feed(model, cache, 0, 5, chunk=5)
        for t in range(5, 505):
            feed(model, cache, t, t + 1)
            if t in (5, W + 1, 504):  # after call 2, after the first eviction, after 500 one-token steps
                sizes[t] = cache.nbytes
    assert len(set(sizes.values())) == 1, sizes
