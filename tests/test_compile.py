"""Static shapes: a decode step with ``SinkCache(static_shapes=True)`` compiles once and never recompiles.

Dynamo (``backend="eager"``: tracing and guards without code generation, so the test needs no C++ compiler) runs
a stream through compactions and position re-bases. The only graph break must be the planning hook, which runs
before the model's forward by design; the cache itself must not break the graph or make it recompile. The
default addressing (views with Python-int bounds) is the negative control: it does recompile.
"""

from __future__ import annotations

import pytest
import torch

from sinkcache import CACHE_KWARG, SinkCache, enable_streaming
from tests.zoo import tiny_model

WINDOW, SINKS = 16, 4  # slack 16: a compaction every 16 steps and a re-base every ~32 in a 100-step stream
PROMPT, STEPS = 20, 100



def stream(model, cache: SinkCache, step_fn) -> tuple[torch.Tensor, list[int]]:
    """Prefill eagerly, then decode ``STEPS`` tokens with ``step_fn``; the logits and the graph count per step."""
    tokens = torch.randint(3, 97, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))
    logits, graphs = [], []
    with torch.no_grad():
        model(input_ids=tokens[:, :PROMPT], **{CACHE_KWARG: cache})
        for t in range(PROMPT, PROMPT + STEPS):
            logits.append(step_fn(input_ids=tokens[:, t : t + 1], **{CACHE_KWARG: cache}).logits[0, -1])
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return torch.stack(logits), graphs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: sliding and full layers, two masks
def test_static_decode_step_compiles_once(arch):
    model = enable_streaming(tiny_model(arch), WINDOW, SINKS)
    want, _ = stream(model, SinkCache(WINDOW, SINKS), model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    got, graphs = stream(model, SinkCache(WINDOW, SINKS, static_shapes=True), compiled)
    assert (got - want).abs().max() < 1e-5
    assert graphs[-1] == graphs[2] > 0, f"graphs compiled after warm-up: {graphs}"  # compactions, re-bases included


def test_only_break_is_the_planning_hook():
    """Dynamo lists one break per enclosing frame; every one must be the hook's, none may come from the cache."""
    model = enable_streaming(tiny_model("llama"), WINDOW, SINKS)
    cache = SinkCache(WINDOW, SINKS, static_shapes=True)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 97, (1, 40)), **{CACHE_KWARG: cache})
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.compile(model, backend="eager", dynamic=False)(input_ids=torch.tensor([[5]]), **{CACHE_KWARG: cache})
    reasons = list(torch._dynamo.utils.counters["graph_break"])
    assert reasons and all("_plan_outside_graph" in reason for reason in reasons), reasons


def test_default_addressing_recompiles():
    """Negative control: with Python-int views, the same stream keeps producing new graphs."""
    model = enable_streaming(tiny_model("llama"), WINDOW, SINKS)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=64):
        _, graphs = stream(model, SinkCache(WINDOW, SINKS), compiled)
    assert graphs[-1] > graphs[2] + 5


def test_compiled_generate_with_static_shapes_equals_eager():
    """generate() on a model whose decoder forward is compiled: the same tokens as the uncompiled default cache."""
    with pytest.raises(TypeError, match="static_shapes"):
        SinkCache(16, 4, static_shapes="yes")  # type: ignore[arg-type]
    model = enable_streaming(tiny_model("llama"), WINDOW, SINKS, static_shapes=True)
    model.generation_config.eos_token_id = None
    prompt = torch.randint(3, 97, (1, 23), generator=torch.Generator().manual_seed(1))
    default = model.generate(prompt, max_new_tokens=60, do_sample=False, cache=SinkCache(WINDOW, SINKS))
    torch._dynamo.reset()
    model.model.forward = torch.compile(model.model.forward, backend="eager", dynamic=False)
    cache = SinkCache(WINDOW, SINKS, static_shapes=True)
    assert torch.equal(model.generate(prompt, max_new_tokens=60, do_sample=False, cache=cache), default)
    assert cache.layers[0].keys.shape[-2] == WINDOW + cache.slack
    seen = []  # the cache generate() brings itself, from enable_streaming's settings
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs[CACHE_KWARG]),
                                                 with_kwargs=True)
    assert torch.equal(model.generate(prompt, max_new_tokens=60, do_sample=False), default)
    hook.remove()
    assert seen and all(isinstance(cache, SinkCache) and cache.static_shapes for cache in seen)
