"""``enable_streaming``: make any RoPE causal LM of transformers stream with a SinkCache, through public APIs only.

Two things are installed, both removed exactly by ``disable_streaming``:

1. a forward pre-hook on the model's decoder (``model.base_model``). When a forward call carries a ``SinkCache``,
   the hook asks the cache to plan the step and replaces ``position_ids`` (positions inside the cache) and
   ``attention_mask`` (validity of the cache's slots). Calls with any other cache pass through untouched.
2. an instance-level ``generate`` that creates a fresh ``SinkCache`` per call unless the caller passes one, and
   prefills long prompts in chunks so memory is bounded by the cache size.

Before installing anything, the model's rotation is verified empirically: one token is run at two positions and
every layer's keys must differ by exactly the rotation sinkcache would apply. A model whose keys do not (learned
positions, ALiBi, interleaved or multi-dimensional RoPE, a transform after RoPE) is refused with the reason.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from . import compat
from .cache import SinkCache
from .rotary import RopeSpec, UnsupportedModelError, read_rope_spec, rotate


@dataclass
class _Streaming:
    window_length: int
    num_sink_tokens: int
    prefill_chunk_size: int
    static_shapes: bool
    rope: RopeSpec
    hooks: list[torch.utils.hooks.RemovableHandle]
    had_own_generate: bool
    own_generate: Any


_ENABLED: weakref.WeakKeyDictionary[nn.Module, _Streaming] = weakref.WeakKeyDictionary()
_PROBE_DISTANCE = 11  # positions between the two probe tokens: large enough that any wrong rotation shows


def enable_streaming(
    model: PreTrainedModel,
    window_length: int = 1024,
    num_sink_tokens: int = 4,
    *,
    prefill_chunk_size: int | None = None,
    static_shapes: bool = False,
) -> PreTrainedModel:
    """Make ``model`` stream with a ``SinkCache``; returns the same model.

    Afterwards ``model.generate(input_ids, max_new_tokens=...)`` uses a fresh ``SinkCache(window_length,
    num_sink_tokens)`` per call unless a cache is passed with ``cache=`` (or the deprecated ``past_key_values=``),
    and any forward call given a ``SinkCache`` gets positions inside the cache. Calling it again replaces the
    settings.

    Args:
        model: a transformers causal LM with rotary position embeddings.
        window_length: tokens kept, sinks included.
        num_sink_tokens: first tokens of the stream kept forever.
        prefill_chunk_size: prompt tokens per forward call inside ``generate`` (default: ``window_length``);
            bounds prefill memory by the cache size instead of the prompt length.
        static_shapes: give ``generate``'s caches static shapes (``SinkCache(..., static_shapes=True)``), so that
            the decode step of a compiled model (``torch.compile``) compiles once.

    Raises:
        UnsupportedModelError: the model's positions cannot be shifted inside a cache; the message says why.
    """
    SinkCache(window_length, num_sink_tokens, static_shapes=static_shapes)  # validates with the cache's messages
    if static_shapes and compat.builds_legacy_mask(getattr(model, "base_model", model)):
        raise ValueError(compat.LEGACY_MASK_STATIC)
    chunk = window_length if prefill_chunk_size is None else prefill_chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill_chunk_size must be a positive int, got {prefill_chunk_size!r}.")
    if model in _ENABLED:
        disable_streaming(model)
    rope = read_rope_spec(model)
    if rope.max_position is not None and window_length >= rope.max_position:
        raise ValueError(
            f"window_length ({window_length}) must be below {rope.max_position}: this model's RoPE "
            "(dynamic/longrope) changes its frequencies past that length, which would break shifted keys."
        )
    _verify_rotation(model, rope)
    decoder = getattr(model, "base_model", model)
    names = compat.forward_parameters(decoder)
    keyword = compat.cache_keyword(decoder)
    if keyword is None:
        raise UnsupportedModelError(f"{type(decoder).__name__}.forward takes no cache (neither `cache` nor "
                                    "`past_key_values`), so it cannot stream with a SinkCache.")
    with_cache_position = compat.takes_cache_position(decoder)
    legacy_mask = compat.builds_legacy_mask(decoder)

    def position_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            kwargs = {**dict(zip(names, args)), **kwargs}
        cache = kwargs.get(keyword)
        if keyword == "cache" and cache is None:  # the deprecated name, which the model itself still renames
            cache = kwargs.pop("past_key_values", None)
        if not isinstance(cache, SinkCache):
            if keyword != "cache" and isinstance(kwargs.get("cache"), SinkCache):
                raise TypeError(compat.wrong_keyword_message(keyword))
            return None
        kwargs[keyword] = cache
        if legacy_mask and cache.static_shapes:
            raise ValueError(compat.LEGACY_MASK_STATIC)
        positions_for_step = _positions_for_step_outside_graph if torch.compiler.is_compiling() else _positions_for_step
        return (), positions_for_step(cache, kwargs, rope, with_cache_position, legacy_mask)

    def step_done_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = kwargs.get(keyword)
        if isinstance(cache, SinkCache):
            cache.end_step()

    hooks = [decoder.register_forward_pre_hook(position_hook, with_kwargs=True)]
    if compat.QUERY_OFFSET_FROM_SEQ_LENGTH:  # the cache must know when the step's forward is over (see compat)
        hooks.append(decoder.register_forward_hook(step_done_hook, with_kwargs=True))
    own = model.__dict__.get("generate")
    _ENABLED[model] = _Streaming(
        window_length, num_sink_tokens, chunk, static_shapes, rope, hooks, "generate" in model.__dict__, own,
    )
    model.__dict__["generate"] = _streaming_generate(model)  # an instance attribute shadows the method
    return model


def disable_streaming(model: PreTrainedModel) -> PreTrainedModel:
    """Remove what ``enable_streaming`` installed; the model is then exactly as before. Harmless if not enabled."""
    state = _ENABLED.pop(model, None)
    if state is None:
        return model
    for hook in state.hooks:
        hook.remove()
    if state.had_own_generate:
        model.__dict__["generate"] = state.own_generate
    else:
        del model.__dict__["generate"]
    return model


def is_streaming(model: nn.Module) -> bool:
    """Whether ``enable_streaming`` is in effect on ``model``."""
    return model in _ENABLED


def _positions_for_step(cache: SinkCache, kwargs: dict, rope: RopeSpec, with_cache_position: bool,
                        legacy_mask: bool) -> dict:
    """Plan the cache's next step and put its positions and slot mask into the forward's kwargs.

    For a decoder whose causal mask reads its query indices from ``cache_position`` (transformers 5.0-5.3), that is
    the new tokens' buffer indices; for one that also builds the mask itself (``compat.builds_legacy_mask``), their
    indices among the attended keys, with the slot mask cut to those keys.
    """
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        raise ValueError("A forward call with a SinkCache needs input_ids or inputs_embeds.")
    batch, n = inputs.shape[:2]
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[-1] < n):
        raise ValueError(
            "SinkCache needs a 2D attention_mask of shape [batch, tokens so far] (or none): a prepared 4D or "
            "per-layer mask cannot follow the cache's evictions. Pass the usual padding mask."
        )
    position_ids, slot_mask = cache.begin_step(batch, n, None if mask is None else mask[:, -n:], rope, inputs.device)
    kwargs["position_ids"] = position_ids
    if with_cache_position:
        queries = cache.query_indices(inputs.device)
        if legacy_mask:  # its mask's columns are the attended keys, from the first: count from there
            first = cache.mask_sizes()[1]
            queries, slot_mask = queries - first, None if slot_mask is None else slot_mask[:, first:]
        kwargs["cache_position"] = queries
    kwargs["attention_mask"] = None if slot_mask is None else slot_mask.to(inputs.device)
    return kwargs


# Host-side planning: a compiled forward runs it eagerly and only ever sees its tensors. Eager calls skip the
# wrapper, which costs a few microseconds per step.
_positions_for_step_outside_graph = torch.compiler.disable(_positions_for_step)


def _streaming_generate(model: PreTrainedModel) -> Callable[..., Any]:
    """``model.generate`` that brings its own SinkCache and prefills in chunks."""
    original = model.generate
    key = compat.cache_keyword(model) or compat.CACHE_KWARG
    keywords = key, "past_key_values" if key == "cache" else "cache"

    def generate(*args: Any, **kwargs: Any):
        state = _ENABLED[model]
        # generate() takes the cache by the keyword of the model's forward; either name is accepted here
        key, other = keywords
        if other in kwargs and key not in kwargs:
            kwargs[key] = kwargs.pop(other)
        if kwargs.get(key) is None and kwargs.get("use_cache", True) is not False:
            kwargs[key] = SinkCache(state.window_length, state.num_sink_tokens, static_shapes=state.static_shapes)
        if isinstance(kwargs.get(key), SinkCache) and "prefill_chunk_size" not in kwargs:
            config = kwargs.get("generation_config") or model.generation_config
            if getattr(config, "prefill_chunk_size", None) is None:
                kwargs["prefill_chunk_size"] = state.prefill_chunk_size
        return original(*args, **kwargs)  # type: ignore[operator]

    generate.__doc__ = f"Streaming generate (sinkcache): {original.__doc__ or ''}"
    return generate


def _verify_rotation(model: PreTrainedModel, rope: RopeSpec) -> None:
    """Run one token at positions 0 and d; every layer's keys must be related by sinkcache's rotation by d.

    With a single token each layer attends only to itself, so its un-rotated keys do not depend on the position:
    the two runs differ only by the model's own rotary embedding, which this compares with ``rotate``.
    """
    config = model.config.get_text_config(decoder=True)
    weight = next(model.get_input_embeddings().parameters())
    device = weight.device if weight.device.type != "meta" else torch.device("cpu")
    token = torch.tensor([[min(100, config.vocab_size - 1)]], device=device)
    keyword = compat.cache_keyword(model)
    if keyword is None:
        raise UnsupportedModelError(f"{type(model).__name__}.forward takes no cache (neither `cache` nor "
                                    "`past_key_values`), so it cannot stream with a SinkCache.")
    keys = []
    with torch.no_grad():
        for position in (0, _PROBE_DISTANCE):
            cache = DynamicCache()
            model(input_ids=token, position_ids=torch.tensor([[position]], device=device), use_cache=True,
                  **{keyword: cache})
            keys.append([layer.keys.float() for layer in cache.layers
                         if isinstance(layer, DynamicLayer) and layer.keys is not None])
    if not keys[0]:  # the model dropped the cache: comparing no keys would accept anything
        raise UnsupportedModelError(
            f"{type(model).__name__} stored no keys in the cache it was given as `{keyword}=`, so sinkcache cannot "
            "verify its rotary embedding. Custom models must pass their cache to every attention layer."
        )
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
    model_type = getattr(config, "model_type", type(model).__name__)
    for layer_idx, (at_zero, at_d) in enumerate(zip(*keys)):
        if at_zero.norm() == 0:
            continue
        inv_freq = rope.inv_freq_per_layer[layer_idx].to(at_zero.device)
        if 2 * inv_freq.numel() > at_zero.shape[-1]:
            raise UnsupportedModelError(f"{model_type}: rotary dimension exceeds the key head dimension.")
        moved = rotate(at_zero, torch.tensor(_PROBE_DISTANCE, device=at_zero.device), inv_freq)
        error = ((moved - at_d).norm() / at_d.norm()).item()
        if error > tolerance:
            raise UnsupportedModelError(
                f"{model_type}: the keys of layer {layer_idx} do not follow the half-split rotary embedding read "
                f"from the model (relative error {error:.3g} after moving a key {_PROBE_DISTANCE} positions), so "
                "sinkcache cannot re-position them. Interleaved or multi-dimensional RoPE, learned or ALiBi "
                "positions, and transforms applied after RoPE are not supported."
            )
