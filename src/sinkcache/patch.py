"""``enable_streaming``: make any RoPE causal LM of transformers stream with a SinkCache, through public APIs only.

Two things are installed, both removed exactly by ``disable_streaming``:

1. a forward pre-hook on the model's decoder (``model.base_model``). When a forward call carries a ``SinkCache``,
   the hook asks the cache to plan the step and replaces ``position_ids`` (positions inside the cache) and
   ``attention_mask`` (validity of the cache's slots). Calls with any other cache pass through untouched.
2. an instance-level ``generate`` that creates a fresh ``SinkCache`` per call unless the caller passes one, and
   prefills long prompts in chunks so memory is bounded by the cache size.

Both are objects that serve only their own model: ``copy.deepcopy(model)`` gives a copy that is not streaming (its
copied hook passes every call through, its copied ``generate`` runs the copy's plain one) until it is enabled.

Before installing anything, the model's rotation is verified empirically: one token is run at two positions and
every layer's keys must differ by exactly the rotation sinkcache would apply. A model whose keys do not (learned
positions, ALiBi, interleaved or multi-dimensional RoPE, a transform after RoPE) is refused with the reason. With
the hook installed, the self-check (``selfcheck``) then streams a short text through a small SinkCache and compares
its logits with a cache-free reference, which proves the plumbing of the installed transformers on this very model;
a mismatch removes the hook again and refuses loudly. Both verdicts are kept per model for the process.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from . import compat, selfcheck
from .cache import GRAD_MODE, SinkCache
from .cache.sink_cache import check_sizes
from .rotary import RopeSpec, UnsupportedModelError, read_rope_spec, rotate


@dataclass
class _Streaming:
    window_length: int
    num_sink_tokens: int
    prefill_chunk_size: int
    static_shapes: bool
    rope: RopeSpec
    hooks: list[torch.utils.hooks.RemovableHandle]


_ENABLED: weakref.WeakKeyDictionary[nn.Module, _Streaming] = weakref.WeakKeyDictionary()
_PROBE_DISTANCE = 11  # positions between the two probe tokens: large enough that any wrong rotation shows


def enable_streaming(
    model: PreTrainedModel,
    window_length: int = 1024,
    num_sink_tokens: int = 4,
    *,
    prefill_chunk_size: int | None = None,
    static_shapes: bool = False,
    verify: bool = True,
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
        verify: run the self-check (``sinkcache.selfcheck``: 9 short forward calls, once per model and process)
            that proves streaming exact on this model and the installed transformers. ``False`` skips it, for a
            model and release known to pass; the one-token rotation probe (2 calls) still runs.

    Per call, ``generate(..., cache_implementation=...)`` or a cache that is not a ``SinkCache`` opts out of
    streaming (see ``_StreamingGenerate``). ``copy.deepcopy`` of an enabled model is not enabled.

    Raises:
        UnsupportedModelError: the model's positions cannot be shifted inside a cache; the message says why.
        SelfCheckError: streaming this model on the installed transformers does not give the contract's logits;
            the message says what differed. Nothing stays installed.
        ValueError: the model's weights are on the meta device (not loaded yet), or an argument is invalid.
    """
    if not isinstance(verify, bool):
        raise TypeError(f"enable_streaming's verify must be True or False, got {verify!r}.")
    check_sizes(window_length, num_sink_tokens, static_shapes, "enable_streaming")
    _require_real_weights(model)
    decoder = getattr(model, "base_model", model)
    if compat.cache_keyword(decoder) is None:
        raise UnsupportedModelError(f"{type(decoder).__name__}.forward takes no cache (neither `cache` nor "
                                    "`past_key_values`), so it cannot stream with a SinkCache.")
    if static_shapes and compat.builds_legacy_mask(decoder):
        raise ValueError(compat.LEGACY_MASK_STATIC)
    chunk = window_length if prefill_chunk_size is None else prefill_chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill_chunk_size must be a positive int, got {prefill_chunk_size!r}.")
    if model in _ENABLED:
        disable_streaming(model)
    _remove_installed(model)
    rope = read_rope_spec(model)
    if rope.max_position is not None and window_length >= rope.max_position:
        raise ValueError(
            f"window_length ({window_length}) must be below {rope.max_position}: this model's RoPE "
            "(dynamic/longrope) changes its frequencies past that length, which would break shifted keys."
        )
    checked = selfcheck.passed(model, static_shapes)  # this model passed both checks before, computing as now
    if not checked:
        _verify_rotation(model, rope)
    had_own, own = "generate" in model.__dict__, model.__dict__.get("generate")
    hooks = [decoder.register_forward_pre_hook(_PositionHook(decoder, rope), with_kwargs=True)]
    if compat.QUERY_OFFSET_FROM_SEQ_LENGTH:  # the cache must know when the step's forward is over (see compat)
        hooks.append(decoder.register_forward_hook(_StepDone(decoder), with_kwargs=True))
    _ENABLED[model] = _Streaming(window_length, num_sink_tokens, chunk, static_shapes, rope, hooks)
    model.__dict__["generate"] = _StreamingGenerate(model, had_own, own)  # an instance attribute shadows the method
    if verify and not checked:
        try:
            selfcheck.check(model, compat.cache_keyword(model) or compat.CACHE_KWARG, static_shapes)
        except BaseException:
            disable_streaming(model)
            raise
        selfcheck.record_pass(model, static_shapes)
    return model


def disable_streaming(model: PreTrainedModel) -> PreTrainedModel:
    """Remove what ``enable_streaming`` installed; the model is then exactly as before. Harmless if not enabled."""
    state = _ENABLED.pop(model, None)
    if state is not None:
        for hook in state.hooks:
            hook.remove()
    _remove_installed(model)
    return model


def is_streaming(model: nn.Module) -> bool:
    """Whether ``enable_streaming`` is in effect on ``model``."""
    return model in _ENABLED


def _remove_installed(model: nn.Module) -> None:
    """Remove sinkcache's hooks on the decoder and its ``generate``, putting back the ``generate`` the model had
    before. Also what a copy of an enabled model carries over (``copy.deepcopy``), which passes through while the copy
    is not enabled. Call only when ``model`` is not enabled."""
    decoder = getattr(model, "base_model", model)
    for hooks, with_kwargs in ((decoder._forward_pre_hooks, decoder._forward_pre_hooks_with_kwargs),
                               (decoder._forward_hooks, decoder._forward_hooks_with_kwargs)):
        for key, hook in list(hooks.items()):
            if isinstance(hook, (_PositionHook, _StepDone)):
                del hooks[key]
                with_kwargs.pop(key, None)
    generate = model.__dict__.get("generate")
    if isinstance(generate, _StreamingGenerate):  # put back what the model had before it was enabled
        if generate.had_own:
            model.__dict__["generate"] = generate.own
        else:
            del model.__dict__["generate"]


def _require_real_weights(model: nn.Module) -> None:
    """Refuse weights that are only shapes (``accelerate.init_empty_weights``, ``device="meta"``); weights that
    accelerate offloads (a module with an ``_hf_hook`` loads its meta weights at each forward) are real."""
    hooked = [name for name, module in model.named_modules() if hasattr(module, "_hf_hook")]
    tensors = [*model.named_parameters(), *model.named_buffers()]
    empty = [name for name, t in tensors
             if t.is_meta and not any(h == "" or name.startswith(h + ".") for h in hooked)]
    if empty:
        raise ValueError(
            f"{type(model).__name__} has weights on the meta device (e.g. {empty[0]}), as models built under "
            "accelerate.init_empty_weights() or with device='meta' do: sinkcache runs the model once to verify its "
            "rotary embedding. Load the real weights first (from_pretrained, or load_checkpoint_and_dispatch), then "
            "call enable_streaming."
        )


class _PositionHook:
    """The forward pre-hook on the decoder: calls that carry a ``SinkCache`` get their positions inside the cache.

    It serves only the decoder it was installed on (held by a weak reference, which ``copy.deepcopy`` does not copy):
    in a deep copy of the model, its copy passes every call through.
    """

    def __init__(self, decoder: nn.Module, rope: RopeSpec):
        self.decoder = weakref.ref(decoder)
        self.rope = rope
        self.names = compat.forward_parameters(decoder)
        # never the fallback: enable_streaming refuses a decoder that takes no cache
        self.keyword = compat.cache_keyword(decoder) or compat.CACHE_KWARG
        self.with_cache_position = compat.takes_cache_position(decoder)
        self.legacy_mask = compat.builds_legacy_mask(decoder)
        if self.legacy_mask:  # its own mask is one for every layer, in the full-attention layers' slots
            self.rope = replace(rope, sliding_windows=())

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if module is not self.decoder():
            return None
        if args:
            kwargs = {**dict(zip(self.names, args)), **kwargs}
        cache = kwargs.get(self.keyword)
        if self.keyword == "cache" and cache is None:  # the deprecated name, which the model itself still renames
            cache = kwargs.pop("past_key_values", None)
        if not isinstance(cache, SinkCache):
            if self.keyword != "cache" and isinstance(kwargs.get("cache"), SinkCache):
                raise TypeError(compat.wrong_keyword_message(self.keyword))
            return None
        kwargs[self.keyword] = cache
        if self.legacy_mask and cache.static_shapes:
            raise ValueError(compat.LEGACY_MASK_STATIC)
        positions_for_step = _plan_outside_graph if torch.compiler.is_compiling() else _positions_for_step
        return (), positions_for_step(cache, kwargs, self.rope, module, self.with_cache_position, self.legacy_mask)


class _StepDone:
    """The forward hook that tells a ``SinkCache`` its step's forward is over, where ``compat`` needs that: on
    transformers 5.0-5.13 the mask reads the query's index from ``get_seq_length`` while the step runs."""

    def __init__(self, decoder: nn.Module):
        self.decoder = weakref.ref(decoder)
        self.keyword = compat.cache_keyword(decoder) or compat.CACHE_KWARG

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = kwargs.get(self.keyword)
        if module is self.decoder() and isinstance(cache, SinkCache):
            cache.end_step()


def _positions_for_step(cache: SinkCache, kwargs: dict, rope: RopeSpec, decoder: nn.Module,
                        with_cache_position: bool, legacy_mask: bool) -> dict:
    """Plan the cache's next step and put its positions and slot mask into the forward's kwargs.

    For a decoder whose causal mask reads its query indices from ``cache_position`` (transformers 5.0-5.3), that is
    the new tokens' buffer indices; for one that also builds the mask itself (``compat.builds_legacy_mask``), their
    indices among the attended keys, with the slot mask cut to those keys. Refuses, before the cache changes, a step
    whose keys would need gradients (see ``GRAD_MODE``)."""
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        raise ValueError("A forward call with a SinkCache needs input_ids or inputs_embeds.")
    if torch.is_grad_enabled() and (inputs.requires_grad or any(p.requires_grad for p in decoder.parameters())):
        raise RuntimeError(GRAD_MODE)
    batch, n = inputs.shape[:2]
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[-1] < n):
        raise ValueError(
            "SinkCache needs a 2D attention_mask of shape [batch, tokens so far] (or none): a prepared 4D or "
            "per-layer mask cannot follow the cache's evictions. Pass the usual padding mask."
        )
    position_ids, slot_mask = cache.begin_step(batch, n, None if mask is None else mask[:, -n:], rope, inputs.device)
    # sinkcache.ledger: what this step consumed, for generate()'s check that a later prompt continues the stream (the
    # plan's validity of the new columns: on the CPU, and None when all are real tokens, as in every decode step)
    assert cache.plan is not None
    cache.ledger.record(kwargs.get("input_ids"), cache.plan.new_mask, batch, n)
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
@torch.compiler.disable
def _plan_outside_graph(cache: SinkCache, *args: Any) -> dict:
    """``_positions_for_step`` for a compiled forward, with the sinks' rotation that a step leaves to its layers'
    updates run here too: inside the graph it would depend on the step's positions."""
    kwargs = _positions_for_step(cache, *args)
    cache.rotate_pending()
    return kwargs


class _StreamingGenerate:
    """``model.generate`` while streaming is enabled: brings a fresh SinkCache per call and prefills in chunks.

    Per call, ``cache_implementation=...`` or a cache that is not a ``SinkCache`` (``cache=`` / ``past_key_values=``)
    opts out: the call is then exactly transformers' ``generate``, as is a call with ``use_cache=False`` (which
    warns: no cache, no streaming). A ``cache_implementation`` that only sits in a generation config is ignored for
    the call, with a warning (streaming was asked for by enabling it); the config object is not modified.

    A callable object rather than a closure so that ``copy.deepcopy(model)`` maps ``model`` to the copy: there it runs
    the copy's own generate for as long as the copy is not enabled.
    """

    def __init__(self, model: PreTrainedModel, had_own: bool, own: Any):
        self.model, self.had_own, self.own = model, had_own, own
        self.keyword = compat.cache_keyword(model) or compat.CACHE_KWARG  # what this model's generate() takes
        plain = type(model).generate  # type: ignore[attr-defined]  # GenerationMixin's, which mypy does not see
        self.__doc__ = f"Streaming generate (sinkcache): {plain.__doc__ or ''}"

    def plain(self) -> Any:
        """The ``generate`` that the model had before streaming was enabled."""
        return self.own if self.had_own else type(self.model).generate.__get__(self.model)  # type: ignore[attr-defined]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        state = _ENABLED.get(model)
        key = self.keyword  # either name is accepted here; generate() gets the one its model takes
        other = "past_key_values" if key == "cache" else "cache"
        if other in kwargs:
            kwargs.setdefault(key, kwargs.pop(other))
        cache = kwargs.get(key)
        if state is None or kwargs.get("cache_implementation") is not None \
                or (cache is not None and not isinstance(cache, SinkCache)):
            return self.plain()(*args, **kwargs)  # not enabled (a copied model), or the per-call opt-out
        passed = kwargs.get("generation_config", args[1] if len(args) > 1 else None)  # generate(inputs, config)
        config = passed or model.generation_config

        def setting(name: str) -> Any:  # transformers' order: the call's kwargs, a passed config, the model's
            if name in kwargs:
                return kwargs[name]
            value = getattr(passed, name, None)
            return getattr(model.generation_config, name, None) if value is None else value

        if setting("use_cache") is False:
            warnings.warn(
                "generate(use_cache=False) on a model with sinkcache streaming enabled: no cache is used, so this call "
                "does not stream (every token attends to every earlier one). Drop use_cache=False to stream.",
                stacklevel=2,
            )
            return self.plain()(*args, **kwargs)
        configured = setting("cache_implementation")
        if configured is not None and configured != "hybrid":  # transformers itself drops "hybrid"
            warnings.warn(
                f"generation_config.cache_implementation={configured!r} is ignored for this call: streaming is enabled "
                "(sinkcache.enable_streaming), so generate() uses a SinkCache. To use that cache instead, pass "
                f"generate(..., cache_implementation={configured!r}) for one call, or call "
                "sinkcache.disable_streaming(model).",
                stacklevel=2,
            )
        if "cache_implementation" in kwargs or configured is not None:
            kwargs["cache_implementation"] = None  # overrides both configs for this call, modifying neither
        if cache is None:
            cache = SinkCache(state.window_length, state.num_sink_tokens, static_shapes=state.static_shapes)
        kwargs[key] = cache
        if "prefill_chunk_size" not in kwargs and getattr(config, "prefill_chunk_size", None) is None:
            kwargs["prefill_chunk_size"] = state.prefill_chunk_size
        chunk = kwargs["prefill_chunk_size"] if "prefill_chunk_size" in kwargs else config.prefill_chunk_size
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        embeds = kwargs.get("inputs_embeds") if ids is None and not model.config.is_encoder_decoder else None
        # Prefill ourselves where transformers' chunked prefill would not bound it or would feed tokens twice:
        # - it chunks input_ids only, and would feed every embedding it is given (the whole conversation on a later
        #   turn); its plain prefill feeds those the cache has not seen;
        # - on a cache that continues a stream (a later turn), releases before 5.14 restart their chunks at the
        #   conversation's first token. Done the same way on every release.
        prompt, name = (embeds, "inputs_embeds") if embeds is not None else (ids, "input_ids")
        if cache.seen and isinstance(prompt, torch.Tensor):  # refuse a prompt that does not continue the stream
            cache.ledger.require_prefix(ids if embeds is None else None, kwargs.get("attention_mask"))
        if isinstance(prompt, torch.Tensor) and (embeds is not None or cache.seen):
            if chunk is not None and (setting("num_beams") or 1) * (setting("num_return_sequences") or 1) == 1:
                self._prefill(cache, name, prompt, kwargs.get("attention_mask"), chunk)
            kwargs["prefill_chunk_size"] = None
        return self.plain()(*args, **kwargs)

    def _prefill(self, cache: SinkCache, name: str, prompt: torch.Tensor, mask: torch.Tensor | None,
                 chunk: int) -> None:
        """Feed all but the last prefill chunk of the prompt's unseen part (``input_ids`` or ``inputs_embeds``,
        the whole conversation so far), in the chunks of transformers' chunked prefill; ``generate`` then feeds the
        last one, slicing the conversation to what the cache has not seen."""
        past = cache.seen
        stop = past + max(prompt.shape[1] - past - 1, 0) // chunk * chunk
        with torch.no_grad():
            for start in range(past, stop, chunk):
                end = start + chunk
                self.model(**{name: prompt[:, start:end]}, attention_mask=None if mask is None else mask[:, :end],
                           use_cache=True, **{self.keyword: cache})


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
    with selfcheck.evaluating(model):  # dropout off, no gradients
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
