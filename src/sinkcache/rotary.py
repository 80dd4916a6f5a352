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


class RotationTable:
    """cos/sin at full head width for a run of consecutive positions, so that rotating the sinks is two products and
    a sum: ``rotated = keys * cos + keys[..., partner] * sin``, where ``partner`` swaps the two rotary halves and the
    pass-through dimensions get cos 1, sin 0.

    The sinks' positions move on by one per step, so the table holds ``count + ahead - 1`` rows from ``first``: the
    rows of ``ahead`` consecutive steps, whose views are made once. When a step needs positions outside them (every
    ``ahead`` steps) the table is rewritten in place: the same angles as ``rotation`` (float64), in six small
    kernels, and the views stay valid. Its size does not grow with the cache.
    """

    def __init__(self, inv_freq: torch.Tensor, head_dim: int, count: int, ahead: int):
        half = inv_freq.shape[-1]
        self.inv_freq, self.head_dim, self.count, self.ahead = inv_freq, head_dim, count, ahead
        self.partner = torch.cat((torch.arange(half, 2 * half), torch.arange(half), torch.arange(2 * half, head_dim)))
        self.partner = self.partner.to(inv_freq.device)
        self.allocate()
        self._build(0)  # the table has its size from the start (SinkCache.nbytes)

    def allocate(self) -> None:
        """(Re)make the table's tensors and their views; ``_build`` then fills them. Also what a copy of the cache
        needs (views do not survive pickling) and what leaving ``torch.inference_mode()`` needs."""
        size, half, device = self.count + self.ahead - 1, self.inv_freq.shape[-1], self.inv_freq.device
        self.cos = torch.ones(size, self.head_dim, device=device)  # pass-through dimensions: cos 1, sin 0
        self.sin = torch.zeros(size, self.head_dim, device=device)
        # the two rotary halves of every row, written together: cos on both, -sin on the first and sin on the second
        self._cos_halves = self.cos[:, : 2 * half].view(size, 2, half)
        self._sin_halves = self.sin[:, : 2 * half].view(size, 2, half)
        self._signs = torch.tensor([[-1.0], [1.0]], dtype=torch.float64, device=device)
        self._row_numbers = torch.arange(size, dtype=torch.float64, device=device)
        self._inv_freq64 = self.inv_freq.to(torch.float64)
        # the rows of each of the `ahead` steps: overlapping windows of the table, views made by one unbind each
        self.runs = tuple(zip(*(t.unfold(0, self.count, 1).transpose(1, 2).unbind(0) for t in (self.cos, self.sin))))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the table holds (``SinkCache.nbytes``)."""
        return self.cos, self.sin, self.partner, self._signs, self._row_numbers, self._inv_freq64

    def _build(self, first: int) -> None:
        """Rewrite the table for the positions ``first ..``: angles ``(first + row) * inv_freq`` in float64, as
        ``rotation`` forms them (exact integers times the frequencies), rounded once to float32."""
        angles = torch.outer(self._row_numbers.add(first), self._inv_freq64)
        self._cos_halves.copy_(angles.cos()[:, None])
        torch.mul(angles.sin()[:, None], self._signs, out=self._sin_halves)
        self.first = first

    def rows(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[count, head_dim]`` float32, for the positions ``first .. first + count - 1``."""
        if not 0 <= first - self.first < self.ahead:
            self._build(first)
        return self.runs[first - self.first]

    def swap_halves(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys[..., partner]``: the rotary halves swapped, which the rotation multiplies by the sines."""
        return keys[..., self.partner]

    def rotate(self, keys: torch.Tensor, first: int, swapped: torch.Tensor, out: torch.Tensor | None = None):
        """Rotate float32 ``keys [..., count, head_dim]`` to the consecutive positions from ``first``.

        ``swapped`` is ``swap_halves(keys)``, kept by the caller. Computed in float32 and rounded once into ``out``
        (any float dtype, may be a strided view) when given.
        """
        if out is None:
            cos, sin = self.rows(first)
            return torch.addcmul(keys * cos, swapped, sin)
        self.rotate_into([(keys, swapped, out)], first)
        return out

    def rotate_into(self, targets: list[tuple[torch.Tensor, ...]], first: int) -> None:
        """``rotate(keys, first, swapped, out=out)`` for each ``(keys, swapped, out)`` of ``targets``."""
        cos, sin = self.rows(first)
        for keys, swapped, out in targets:
            if out.dtype == torch.float32:  # straight into out, no temporary
                torch.mul(keys, cos, out=out).addcmul_(swapped, sin)
            else:  # float32 maths and one rounding into out: a lower-precision out must not hold the product alone
                torch.addcmul(keys * cos, swapped, sin, out=out)


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
