"""The self-check: prove, on the user's own model and installed transformers, that streaming is exact.

transformers changes its cache plumbing between minor releases (the forward's cache keyword, where the causal mask
reads its query offset, which layer methods are abstract: see ``compat``), and a change that sinkcache does not
notice runs silently wrong. ``enable_streaming`` therefore streams a short text through a small ``SinkCache``, with
its hook installed, and compares every logit with a reference that uses no cache at all:

* the stream: ``STREAM`` (20 tokens in 8 forward calls of one token and of chunks) through ``SinkCache(8, 2)``. It
  passes through every state of the cache: prefill, evictions, rolling in place, a chunk that unrolls the ring and
  grows the buffer, a position re-base and the decode steady state after it.
* the reference: one cache-free forward over the stream in which every token attends to exactly what the contract
  (``policy``) says it sees when it is fed, at the contract's query-key distances, through a custom mask. A kept
  window token keeps its stream position (the window is contiguous, so stream and in-cache distances agree). The
  sinks must sit just before the oldest window token, a place that moves with every eviction: each call past the
  window gets its own copy of the sink tokens there, attending only within itself, whose keys and values are the
  sinks' own moved there (RoPE sees distances only). Sliding-window layers also drop keys ``window`` or more
  positions back. Attention implementations that take no custom mask (flash attention) run it as ``sdpa``.

That is ``len(STREAM) + 1`` = 9 forward calls of at most 30 tokens. In so small a cache every layer of a real model
is a full-attention ``SinkLayer``: a ``SlidingLayer`` (a sliding window shorter than the user's ``window_length``)
is not run here on the user's model; the test matrix checks that layer kind on tiny models of every release.

The verdict is kept per model for the process (``passed``), so enabling the same model again costs nothing.
``SelfCheckError`` says what differed and on which transformers release.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel

from . import compat
from .cache import SinkCache

WINDOW, SINKS = 8, 2
#: Tokens per forward call. Before call 3 the cache holds 7 tokens, so calls 1-3 evict nothing; call 4 is the first
#: past the window and starts rolling in place, 5 is the steady state, 6 (a chunk) unrolls the ring and grows the
#: buffer, 7 re-bases the positions (its query would pass 2 * WINDOW + 1), 8 rolls in place again.
STREAM = (6, 1, 5, 1, 1, 4, 1, 1)


class SelfCheckError(RuntimeError):
    """Streaming on this model and transformers release does not give the logits of the contract; the message says
    what differed. Streaming is not enabled."""


def _fingerprint(model: nn.Module, static_shapes: bool) -> tuple:
    """What a verdict depends on besides the model object: where and how it computes, and the cache's addressing."""
    weight = next(model.parameters())
    return (weight.dtype, weight.device, getattr(model.config, "_attn_implementation", None), static_shapes)


# model -> the fingerprints it passed with, for this process
_PASSED: weakref.WeakKeyDictionary[nn.Module, set[tuple]] = weakref.WeakKeyDictionary()


def passed(model: nn.Module, static_shapes: bool) -> bool:
    """Whether ``model`` passed the self-check in this process, as it computes now."""
    return _fingerprint(model, static_shapes) in _PASSED.get(model, set())


def record_pass(model: nn.Module, static_shapes: bool) -> None:
    _PASSED.setdefault(model, set()).add(_fingerprint(model, static_shapes))


def tokens(vocab_size: int, count: int) -> list[int]:
    """``count`` fixed, varied token ids clear of the low ids where models keep their special tokens. Fixed, so that
    every rank of a tensor-parallel model feeds the same ones and the user's random state is left alone."""
    low = 3 if vocab_size < 2000 else 1000
    return [low + (i * 7919) % (vocab_size - low) for i in range(count)]


def reference_inputs(calls: tuple[int, ...], window: int, sinks: int) -> tuple[list[int], list[int], torch.Tensor,
                                                                                 torch.Tensor]:
    """The reference forward's layout for a stream fed in ``calls``: the stream index of each of its inputs (the
    stream's tokens, then the sinks' copies), each input's position, whether input ``i`` attends to input ``j``
    (``[L, L]`` bool) and at which in-cache distance (``[L, L]`` long).

    Token ``t`` of a call that starts at ``start`` sees the kept tokens (all of them up to ``window``, else the
    first ``sinks`` and the last ``window - sinks``) and the call's tokens up to itself. Past the window, its sinks
    are a copy of them at positions ``start - window ..``, just before the oldest kept token."""
    order, placed = list(range(sum(calls))), list(range(sum(calls)))
    seen_by: list[tuple[int, list[int]]] = []  # per stream token: (input index of its sinks' copy or -1, it sees)
    start = 0
    for n in calls:
        copy = -1
        if start > window and sinks:
            copy = len(order)
            order += range(sinks)
            placed += range(start - window, start - window + sinks)
        kept = list(range(start)) if start <= window else [*range(sinks), *range(start - window + sinks, start)]
        seen_by += [(copy, [*kept, *range(start, t + 1)]) for t in range(start, start + n)]
        start += n
    size = len(order)
    allowed = torch.zeros(size, size, dtype=torch.bool)
    distance = torch.zeros(size, size, dtype=torch.long)
    for t, (copy, seen) in enumerate(seen_by):
        for rank, u in enumerate(seen):
            column = copy + u if copy >= 0 and u < sinks else u
            allowed[t, column], distance[t, column] = True, len(seen) - 1 - rank
    block = torch.arange(sinks)
    for copy in {copy for copy, _ in seen_by if copy >= 0}:  # a copy of the sinks attends within itself, causally
        allowed[copy : copy + sinks, copy : copy + sinks] = block[:, None] >= block[None, :]
        distance[copy : copy + sinks, copy : copy + sinks] = block[:, None] - block[None, :]
    return order, placed, allowed, distance


def reference_mask(config, allowed: torch.Tensor, distance: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """The additive ``[1, 1, L, L]`` mask of ``allowed`` for the model's layers: one per layer type where some layers
    slide (keys ``sliding_window`` or more back are dropped too), as transformers' models take it."""

    def additive(keep: torch.Tensor) -> torch.Tensor:
        return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)[None, None]

    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if window and "sliding_attention" in layer_types:
        return {"full_attention": additive(allowed), "sliding_attention": additive(allowed & (distance < window))}
    if window and getattr(config, "use_sliding_window", True):
        return additive(allowed & (distance < window))
    return additive(allowed)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) and without gradients; each module's training flag is put back."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def tolerance(reference: torch.Tensor) -> float:
    """The largest |logit difference| allowed: float rounding only. RoPE sees distances, so the cache's positions
    (shifted by an offset) and the reference's (from 0) give the same logits up to rounding."""
    scale = float(reference.abs().max())
    if reference.dtype == torch.float32:
        return 1e-4 * max(1.0, scale)
    return 0.04 * scale + 0.1  # bfloat16 / float16 keys and attention


def check(model: PreTrainedModel, keyword: str, static_shapes: bool = False) -> None:
    """Stream ``STREAM`` through a ``SinkCache(WINDOW, SINKS)`` on ``model`` (whose streaming hook is installed) and
    compare every logit with the cache-free reference; see the module docstring.

    Raises:
        SelfCheckError: the model dropped the cache, or a call's logits differ from the reference.
    """
    config = model.config.get_text_config(decoder=True)
    device = next(model.get_input_embeddings().parameters()).device
    stream = torch.tensor(tokens(config.vocab_size, sum(STREAM)), device=device)
    order, placed, allowed, distance = reference_inputs(STREAM, WINDOW, SINKS)
    mask = reference_mask(config, allowed, distance, next(model.parameters()).dtype)
    cache = SinkCache(WINDOW, SINKS, static_shapes=static_shapes)
    with evaluating(model):
        streamed, start = [], 0
        for n in STREAM:
            streamed.append(model(input_ids=stream[None, start : start + n], use_cache=True, **{keyword: cache}).logits)
            start += n
        if cache.seen != start or not any(layer.is_initialized for layer in cache.layers):
            _refuse(model, f"the model stored no keys in the SinkCache passed as `{keyword}=` (it dropped the cache)")
        with _masked_attention(config):
            reference = model(input_ids=stream[order][None], position_ids=torch.tensor([placed], device=device),
                              attention_mask=_to(mask, device), use_cache=False).logits[0, :start]
    start = 0
    for call, (n, got) in enumerate(zip(STREAM, streamed), start=1):
        want = reference[start : start + n]
        worst, allowed_error = float((got[0].float() - want.float()).abs().max()), tolerance(want)
        if not worst <= allowed_error:  # NaN fails too
            state = "after evictions" if start > WINDOW else "before any eviction"
            _refuse(model, f"call {call} of {len(STREAM)} ({n} token{'s' * (n > 1)}, {state}) gave logits up to "
                           f"{worst:.3g} away from the cache-free reference (allowed: {allowed_error:.3g})")
        start += n


def _to(mask: torch.Tensor | dict[str, torch.Tensor], device: torch.device) -> torch.Tensor | dict[str, torch.Tensor]:
    return {kind: m.to(device) for kind, m in mask.items()} if isinstance(mask, dict) else mask.to(device)


@contextmanager
def _masked_attention(config) -> Iterator[None]:
    """An attention implementation that takes a custom 4D mask: the model's own where it does (eager, sdpa), else
    sdpa for the reference forward (flash attention takes none)."""
    own = getattr(config, "_attn_implementation", None)
    if own in (None, "eager", "sdpa"):
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = own


def _refuse(model: PreTrainedModel, what: str) -> None:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    raise SelfCheckError(
        f"sinkcache's self-check failed for {type(model).__name__} ({model_type}) on transformers "
        f"{transformers.__version__}: {what}. Streaming was not enabled, since its output would be silently wrong. "
        f"The newest transformers release that sinkcache's CI has verified is {compat.VERIFIED_TRANSFORMERS}: "
        "install that release, or report this message with `python -m sinkcache doctor`'s output. "
        "(enable_streaming(..., verify=False) skips this check; use it only for a model and release known to pass.)"
    )
