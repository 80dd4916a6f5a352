"""Rotary position maths: read a model's RoPE, and move keys to other positions exactly.

A rotary key at position ``p`` is ``R(p) k``, where ``R(p)`` turns each pair of dimensions ``(i, i + r/2)``
of the first ``r`` ("rotary") dimensions by the angle ``p * inv_freq[i]``. This is the half-split layout used by
every RoPE model in transformers (``rotate_half``, and gpt-oss's ``chunk(2)``, are the same maths). Dimensions
past ``r`` (partial rotary: GPT-NeoX, Phi) are left alone. Because ``R(a) R(b) = R(a + b)``, a cached key can be
moved to any position without knowing its unrotated value; only query-key *distances* reach the attention scores.

``inv_freq`` is read from the model's rotary module, where transformers has already folded in linear, llama3,
yarn and (below the model's maximum position) dynamic/longrope scaling. The module's ``attention_scaling`` is
*not* applied here: it is baked into the keys the model produced, and a rotation preserves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

#: RoPE types whose frequencies change with the sequence length; positions must stay below the model's maximum.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rotation(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(cos, sin)`` of shape ``[*positions.shape, r / 2]`` for rotating by ``positions``.

    The angles are formed in float64: a position times a frequency must not lose the phase before the cosine.
    """
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(device=positions.device, dtype=torch.float64)
    return angles.cos().float(), angles.sin().float()


def apply_rotation(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dimensions of ``keys`` (half-split pairs); returns float32."""
    half = cos.shape[-1]
    x = keys.float()
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def rotate(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``keys`` forward by ``positions`` (a negative value rotates back), computing in float32.

    Args:
        keys: ``[..., seq, head_dim]``, any float dtype.
        positions: in units of positions, broadcastable to ``[..., seq]`` (float or integer).
        inv_freq: ``[r / 2]`` inverse frequencies; the first ``r`` dimensions of ``keys`` are rotated.

    Returns:
        float32 tensor shaped like ``keys``; the caller casts once, so rounding never accumulates.
    """
    return apply_rotation(keys, *rotation(positions.to(keys.device), inv_freq))


def halves(keys: torch.Tensor, half: int) -> torch.Tensor:
    """The rotary dimensions of ``keys [..., head_dim]`` as ``[..., 2, half]`` (a view): row 0 the first of each
    rotated pair, row 1 the second. The pass-through dimensions past ``2 * half`` are left out."""
    return keys[..., : 2 * half].unflatten(-1, (2, half))


class RotationTable:
    """cos/sin for a run of consecutive positions, one row of ``r / 2`` per position, for moving the sinks.

    The sinks are stored rotated to positions ``0, 1, ..`` (sink ``j`` at position ``j``), so moving all of them to
    the positions ``p, p + 1, ..`` is one rotation by ``p``: one row serves every sink, and consecutive steps use
    consecutive rows. The table holds ``length`` rows from ``first``, one view per row made once; a position outside
    them rewrites the table in place (four small kernels; the views stay valid). Its size does not grow with the
    cache.

    The rotation works on the rotary dimensions seen as ``[..., 2, r / 2]`` (``halves``), with the sines' signs
    folded into the partner keys (``fold``: ``(-x2, x1)``), so that both halves take the same row:
    ``rotated = keys * cos + folded * sin``. That is transformers' ``rotate_half`` form, and a rotation only ever
    writes the rotary dimensions.
    """

    def __init__(self, inv_freq: torch.Tensor, length: int):
        self.inv_freq, self.half, self.length = inv_freq, inv_freq.shape[-1], length
        self.allocate()
        self._build(0)  # the table has its size from the start (SinkCache.nbytes)

    def allocate(self) -> None:
        """(Re)make the table's tensors and their views; ``_build`` then fills them. Also what a copy of the cache
        needs (views do not survive pickling) and what leaving ``torch.inference_mode()`` needs."""
        device = self.inv_freq.device
        self.cos = torch.empty(self.length, self.half, device=device)
        self.sin = torch.empty(self.length, self.half, device=device)
        self._inv_freq64 = self.inv_freq.to(torch.float64)
        self.rows = tuple(zip(self.cos.unbind(0), self.sin.unbind(0)))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the table holds (``SinkCache.nbytes``)."""
        return self.cos, self.sin, self._inv_freq64

    def _build(self, first: int) -> None:
        """Rewrite the table for the positions ``first ..``: angles ``position * inv_freq`` in float64, as
        ``rotation`` forms them, rounded once to float32."""
        positions = torch.arange(first, first + self.length, dtype=torch.float64, device=self.cos.device)
        angles = torch.outer(positions, self._inv_freq64)
        torch.cos(angles, out=self.cos)
        torch.sin(angles, out=self.sin)
        self.first = first

    def row(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[r / 2]`` float32, of a rotation by ``position``."""
        if not 0 <= position - self.first < self.length:
            self._build(position)
        return self.rows[position - self.first]

    def fold(self, keys: torch.Tensor) -> torch.Tensor:
        """``halves(keys)`` with the pairs' partners swapped and signed, ``(-x2, x1)``, float32: the factor of the
        sines in ``rotate``."""
        pairs = halves(keys.float(), self.half)
        return torch.stack((-pairs[..., 1, :], pairs[..., 0, :]), dim=-2)

    def rotate(self, keys: torch.Tensor, folded: torch.Tensor, position: int, out: torch.Tensor) -> torch.Tensor:
        """Rotate float32 ``keys`` by ``position`` into ``out``, where ``keys``, ``folded`` (``fold(keys)``) and
        ``out`` (any float dtype, may be a strided view) are ``halves`` ``[..., 2, r / 2]``. Computed in float32 and
        rounded once into ``out``."""
        self.rotate_into([(keys, folded, out)], position)
        return out

    def rotate_into(self, targets: list[tuple[torch.Tensor, ...]], position: int) -> None:
        """``rotate(keys, folded, position, out)`` for each ``(keys, folded, out)`` of ``targets``.

        Out-of-place products and an ``add`` into ``out``: the kernels the model's own rotary embedding has just
        run, which in a decode step cost no more than ``mul`` into ``out`` and ``addcmul_`` (kernels the model never
        runs), measured side by side on the tiny model."""
        cos, sin = self.row(position)
        for keys, folded, out in targets:
            torch.add(keys * cos, folded * sin, out=out)


@dataclass(frozen=True)
class RopeSpec:
    """What sinkcache needs to know about one model's rotary embedding (and the reach of its attention).

    Attributes:
        inv_freq_per_layer: one ``[r / 2]`` float32 tensor per decoder layer (Gemma 3 has one per layer type).
        max_position: the largest position (exclusive) at which the frequencies stay fixed, or ``None`` when they
            never change with length.
        model_id: ``id`` of the model the spec was read from; a cache refuses to serve another model.
        local_window: the shortest sliding or chunked attention window (tokens) any layer may use, or ``None`` when
            every layer attends to the whole cache. Such masks count slot distances, so a layer whose window is
            shorter than the cache keeps its slots in stream order (it does not roll in place).
        attention_chunk: the chunk size of chunked-attention layers (Llama 4), or ``None``.
        sliding_windows: per decoder layer, the window (tokens, the query included) of a sliding-attention layer,
            ``None`` for any other layer; the same layers transformers' ``DynamicCache(config=...)`` bounds. Empty
            when unknown: every layer is then stored as a full-attention one (always correct, never smaller).
    """

    inv_freq_per_layer: tuple[torch.Tensor, ...]
    max_position: int | None
    model_id: int
    local_window: int | None = None
    sliding_windows: tuple[int | None, ...] = ()
    attention_chunk: int | None = None
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)

    def frequencies(self, layer_idx: int, device: torch.device) -> torch.Tensor:
        """Layer ``layer_idx``'s ``inv_freq`` on ``device``; one shared tensor per frequency set and device."""
        source = self.inv_freq_per_layer[layer_idx]
        key = (id(source), device)
        entry = self._on_device.get(key)
        if entry is None or entry[0] is not source:  # a copied spec's keys name the original's tensors
            entry = self._on_device[key] = source, source.to(device)
        return entry[1]


class UnsupportedModelError(ValueError):
    """The model has no rotary embedding sinkcache can shift (learned positions, ALiBi, multi-dimensional RoPE)."""


def find_rotary_module(model: nn.Module) -> nn.Module | None:
    """Return the first submodule that owns an ``inv_freq`` buffer (``inv_freq`` or ``<layer_type>_inv_freq``)."""
    for module in model.modules():
        for name, _ in module.named_buffers(recurse=False):
            if name.endswith("inv_freq") and not name.endswith("original_inv_freq"):
                return module
    return None


def read_rope_spec(model: PreTrainedModel) -> RopeSpec:
    """Read the rotary frequencies of every decoder layer of a transformers causal LM.

    Raises:
        UnsupportedModelError: with the reason, for models whose positions cannot be shifted inside a cache.
    """
    config = model.config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", type(model).__name__)
    rope = getattr(config, "rope_parameters", None) or {}
    per_type = rope if isinstance(rope, dict) and all(isinstance(v, dict) for v in rope.values()) and rope else None
    all_params = list(per_type.values()) if per_type else [rope]
    if any(isinstance(p, dict) and ("mrope_section" in p or p.get("mrope_interleaved")) for p in all_params):
        raise UnsupportedModelError(
            f"{model_type} uses multi-dimensional RoPE (M-RoPE: separate time/height/width positions), which "
            "cannot be re-based to positions inside a cache. Use a text-only model with 1D rotary positions."
        )
    rotary = find_rotary_module(model)
    if rotary is None:
        raise UnsupportedModelError(
            f"{model_type} has no rotary position embedding (it uses learned absolute positions, ALiBi or none), "
            "so cached tokens cannot be moved to new positions. sinkcache supports RoPE models only "
            "(Llama, Mistral, Qwen, Gemma, Phi-3, GPT-NeoX, OLMo, Falcon with RoPE, gpt-oss, ...)."
        )
    buffers = dict(rotary.named_buffers(recurse=False))
    num_layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
    per_layer_type: dict[str, torch.Tensor] = {}
    for layer_type in set(layer_types[:num_layers]):
        inv_freq = buffers.get(f"{layer_type}_inv_freq", buffers.get("inv_freq"))
        if inv_freq is None:
            raise UnsupportedModelError(
                f"{model_type}: no rotary frequencies for layer type {layer_type!r} in {type(rotary).__name__}."
            )
        per_layer_type[layer_type] = inv_freq.detach().to("cpu", torch.float32).clone()
    inv_freqs = [per_layer_type[layer_type] for layer_type in layer_types[:num_layers]]

    rope_types = {p.get("rope_type", "default") for p in all_params if isinstance(p, dict)}
    max_position = None
    if rope_types & set(LENGTH_DEPENDENT_ROPE):
        max_position = int(
            getattr(config, "original_max_position_embeddings", None)
            or next((p.get("original_max_position_embeddings") for p in all_params if isinstance(p, dict)
                     and p.get("original_max_position_embeddings")), None)
            or config.max_position_embeddings
        )
    chunk = _positive_int(getattr(config, "attention_chunk_size", None))
    windows = [chunk]
    if getattr(config, "use_sliding_window", True):  # Qwen2 and Qwen3 keep a size even when it is off
        windows.append(_positive_int(getattr(config, "sliding_window", None)))
    local_window = min((w for w in windows if w is not None), default=None)
    return RopeSpec(tuple(inv_freqs), max_position, id(model), local_window, sliding_windows(config, num_layers),
                    chunk)


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def sliding_windows(config: object, num_layers: int) -> tuple[int | None, ...]:
    """Each decoder layer's sliding window (``None``: not a sliding-attention layer), read as transformers reads it
    for ``DynamicCache(config=...)``: the config's ``layer_types`` where it has them, else every layer slides when
    the config sets a ``sliding_window`` (Mistral, Phi-3). Chunked-attention layers are not sliding ones here: their
    mask counts chunk boundaries, which a rolling window of their own would not keep."""
    window = _positive_int(getattr(config, "sliding_window", None))
    if window is None or not getattr(config, "use_sliding_window", True):
        return (None,) * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return (window,) * num_layers
    return tuple(window if kind == "sliding_attention" else None for kind in list(layer_types)[:num_layers])
