"""The layer kinds: what one decoder layer stores, and its ``update``, which applies the step's plan to it.

Each layer holds what it can attend to. Two kinds, chosen per decoder layer from the model's config
(``RopeSpec.sliding_windows``, ``SinkCache._new_layer``):

* ``SinkLayer`` (full attention, and sliding windows long enough to reach a sink): the sinks plus the window, in one
  buffer whose keys and values sit side by side. Past the window, one token per call, it holds ``window_length + 1``
  slots (the kept tokens and the new one) plus the sinks' own copies; a chunk of ``n`` tokens takes
  ``window_length + n`` slots for that call and gives them back at the next one-token call. After the first step
  its storage belongs to a ``LayerGroup`` (``group.py``), and its ``update`` only writes the new keys and values
  (one ``index_copy_`` each, through an index that ``begin_step`` made once for all layers).
* ``SlidingLayer`` (a sliding window ``w`` with ``w - 1 <= window_length - num_sink_tokens``): such a layer can never
  see a sink, so it keeps its last ``w - 1`` tokens only, as transformers' ``DynamicSlidingWindowLayer`` does.

With static shapes every layer is a ``StaticSinkLayer`` (see ``tensors.py``). A layer holds no policy and decides
nothing: ``_receive`` checks that the step it is handed was planned, and the layer applies the ``StepPlan``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from ..rotary import RotationTable, rotate
from .errors import GRAD_MODE, INTERRUPTED, NOT_ENABLED, NotEnabledError
from .plan import StepPlan

if TYPE_CHECKING:  # annotations only: the cache and the group hold their layers
    from .group import LayerGroup
    from .storage import StreamStorage


def _receive(layer: SinkLayer | SlidingLayer, key_states: torch.Tensor,
             value_states: torch.Tensor) -> tuple[StepPlan, torch.Tensor, torch.Tensor]:
    """What every layer kind checks before storing a step's keys: the step was planned by the hook and this layer
    has not missed one, no gradients, the shapes the plan expects. Initialises the layer on its first step and
    returns the plan with the keys and values, padding columns zeroed (so that nothing, not even NaN, leaks from
    masked slots)."""
    parent, compiling = layer.parent, torch.compiler.is_compiling()
    plan = parent.plan
    if not layer.is_initialized:  # a new layer (a reset keeps the layer count)
        if plan is None:
            raise NotEnabledError(NOT_ENABLED)
        if plan.start != 0:  # a layer first seen after the first step missed the stream's first tokens
            raise RuntimeError(INTERRUPTED)
    elif not compiling and layer.step == parent.steps:
        # the layer already stored this step's keys: the hook did not plan this call. (Not checked, nor recorded,
        # inside a compiled step, which would specialise on the step number; the count below still is.)
        raise NotEnabledError(NOT_ENABLED)
    if key_states.requires_grad:  # the hook refuses this first; here for callers that plan steps themselves
        raise RuntimeError(GRAD_MODE)
    assert plan is not None
    if not layer.is_initialized:
        layer.lazy_initialization(key_states, value_states)
        parent.ready += 1
    if not compiling:
        layer.step = parent.steps
    parent.received += 1
    if key_states.shape[0] != layer.batch or key_states.shape[-2] != plan.num_new:
        raise ValueError(
            f"SinkCache layer {layer.layer_idx} expected keys for batch {layer.batch} and "
            f"{plan.num_new} tokens, got {tuple(key_states.shape)}."
        )
    if plan.new_mask is not None:
        keep = plan.new_mask.to(key_states.device)[:, None, :, None]
        key_states, value_states = key_states.masked_fill(~keep, 0), value_states.masked_fill(~keep, 0)
    return plan, key_states, value_states


class StreamLayer(CacheLayerMixin):
    """What every layer kind of a ``SinkCache`` shares: the layers serve one stream, so its length, resets and the
    batch's row selection belong to the cache, and nothing can be cropped."""

    is_compileable = False  # see SinkCache.is_compileable
    is_croppable = False

    def __init__(self, parent: StreamStorage, layer_idx: int):
        super().__init__()
        self.parent, self.layer_idx = parent, layer_idx
        self.step = -1  # the cache's step (SinkCache.steps) whose keys the layer stored last

    def get_seq_length(self) -> int:
        return self.parent.seen

    def get_max_length(self) -> int:
        return -1  # the stream is unbounded; what is kept is bounded by window_length

    def get_max_cache_shape(self) -> int:  # the name of get_max_length before transformers 5.13
        return -1

    def reset(self) -> None:
        """Reset the whole cache (``SinkCache.reset``): the layers share one stream (its plan, groups and positions),
        so a layer cannot forget it alone. transformers' ``Cache.reset`` calls this for every layer; a layer that a
        reset has already replaced (no longer in its cache) has nothing left to forget."""
        if any(layer is self for layer in self.parent.layers):
            self.parent.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass  # rows are selected for all layers at once by SinkCache

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass  # as reorder_cache

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass  # as reorder_cache

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "SinkCache cannot be cropped: evicted tokens are gone, so it cannot roll back. Assisted/speculative "
            "decoding and other callers of crop() need a DynamicCache."
        )


class SinkLayer(StreamLayer):
    """One decoder layer: stores each step's new keys/values and returns the keys/values the step attends to.

    It holds no policy: it applies the ``StepPlan`` of its parent ``SinkCache``. After the first step its storage
    belongs to a ``LayerGroup``, which moves the sinks, compacts and re-bases for all of the group's layers. Keys and
    values share one buffer ``kv`` ``[2, batch, heads, slots, width]`` (``width`` is the larger head dimension);
    ``keys`` and ``values`` are views of it.
    """

    is_sliding = False
    # set by lazy_initialization, before any use (the base class declares them Optional)
    kv: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    sink_keys: torch.Tensor  # [batch, heads, sinks, head_dim] float32, sink j at position j
    sink_values: torch.Tensor
    inv_freq: torch.Tensor
    table: RotationTable

    def __init__(self, parent: StreamStorage, layer_idx: int):
        super().__init__(parent, layer_idx)
        self.group: LayerGroup | None = None
        self.attending: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's views, from the group

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        plan, parent = self.parent.plan, self.parent
        assert plan is not None and parent.rope is not None
        batch, heads, _, head_dim = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.key_dim, self.value_dim = head_dim, value_states.shape[-1]
        sinks = parent.num_sink_tokens
        self.point_to(key_states.new_zeros(2, batch, heads, plan.capacity, max(head_dim, self.value_dim)),
                      key_states.new_zeros(batch, heads, sinks, head_dim, dtype=torch.float32),
                      value_states.new_zeros(batch, heads, sinks, self.value_dim))
        self.inv_freq = parent.rope.frequencies(self.layer_idx, self.device)
        self.table = parent.rotation_table(self.inv_freq)
        self.is_initialized = True

    def point_to(self, kv: torch.Tensor, sink_keys: torch.Tensor, sink_values: torch.Tensor) -> None:
        """Use these tensors (the layer's own, or views into its group's) as storage."""
        self.kv, self.sink_keys, self.sink_values = kv, sink_keys, sink_values
        self.keys, self.values = kv[0, ..., : self.key_dim], kv[1, ..., : self.value_dim]

    @property
    def batch(self) -> int:
        return self.kv.shape[1]

    def signature(self) -> tuple:
        """Layers with equal signatures can share one group."""
        return tuple(self.kv.shape), self.key_dim, self.value_dim, self.dtype, self.device, id(self.table)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Store the new (already rotated) keys/values and return the keys/values this step attends to.

        Returns views of the buffer, ``[batch, heads, slots, head_dim]``: the slots of ``plan.attend``, i.e. the live
        region (sinks first, then the window in stream order, or in ring order when rolling in place) or, with static
        shapes, the whole buffer.
        """
        plan, key_states, value_states = _receive(self, key_states, value_states)
        if plan.capture is not None:
            self._capture_sinks(plan.capture, key_states, value_states)
        group = self.group
        if group is not None and group.pending is not None:
            group.rotate_pending()
        index = plan.write_at if plan.write_at.device == self.device else plan.write_at.to(self.device)
        self.keys.index_copy_(2, index, key_states)  # one kernel each, where a slice assignment takes two
        self.values.index_copy_(2, index, value_states)
        if self.attending is None:  # the first step, before the layers are grouped
            return self.keys[:, :, plan.attend], self.values[:, :, plan.attend]
        return self.attending

    def _capture_sinks(self, capture: tuple[torch.Tensor, ...], key_states: torch.Tensor,
                       value_states: torch.Tensor) -> None:
        """Keep a float32 copy of each row's first tokens, sink ``j`` moved from its position to position ``j``:
        every later sink write starts from it."""
        rows, ids, cols, positions = (t.to(self.device) for t in capture)
        self.sink_keys[rows, :, ids] = rotate(key_states[rows, :, cols], (ids - positions)[:, None], self.inv_freq)
        self.sink_values[rows, :, ids] = value_states[rows, :, cols]
        if self.group is not None:
            self.group.sinks_changed, self.group.values_at = True, -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.parent.mask_sizes()


class StaticSinkLayer(SinkLayer):
    """``SinkLayer`` with static shapes (``SinkCache(static_shapes=True)``): the same layout and positions, but every
    step attends to the layer's whole buffer through the cache's slot mask, and the new tokens are written with one
    ``index_copy_`` through an index tensor into the layer's own tensor, what a compiled step handles best. Every
    layer of such a cache is one of these, sliding or not (one mask serves them all)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Store the new keys/values; return the whole buffer ``[batch, heads, slots, head_dim]``."""
        plan, key_states, value_states = _receive(self, key_states, value_states)
        if plan.capture is not None:
            self._capture_sinks(plan.capture, key_states, value_states)
        if self.key_dim != self.value_dim:  # the narrower one is padded to the storage's width
            width = self.kv.shape[-1]
            key_states = F.pad(key_states, (0, width - self.key_dim))
            value_states = F.pad(value_states, (0, width - self.value_dim))
        self.kv.index_copy_(3, plan.write_at, torch.stack((key_states, value_states)))
        return self.kv[0, ..., : self.key_dim], self.kv[1, ..., : self.value_dim]


class SlidingLayer(StreamLayer):
    """A sliding-window layer whose window cannot reach a sink: it keeps only its last ``sliding_window - 1`` tokens.

    With window ``w`` (the query included) and ``w - 1 <= window_length - num_sink_tokens``, every key such a layer
    may attend to is one of the cache's most recent window tokens, never a sink, so it stores what transformers'
    ``DynamicSlidingWindowLayer`` stores. Its keys keep the rotation they arrived with (only the cache-wide
    position re-base turns them back, once, as it does every key).

    Its keys are the stream slots ``[t - m, t + n)`` (``t`` tokens before the call, ``n`` new, ``m = min(t, w - 1)``
    kept), numbered for the mask like the full-attention layers' buffer (``get_mask_sizes``), so one 2D padding
    mask serves every layer. They are stored in stream order, which the causal mask of a chunk needs, or, once a
    step brings one token and every row has real tokens over the whole window, in a ring of ``w`` slots where
    slot ``s`` lives at index ``s % w``: a step then writes one slot and attends to all ``w`` (each key carries its
    position, and attention without a mask does not depend on the keys' order).
    """

    is_sliding = True
    keys: torch.Tensor  # set by lazy_initialization (the base class declares them Optional)
    values: torch.Tensor
    inv_freq: torch.Tensor

    def __init__(self, parent: StreamStorage, layer_idx: int, sliding_window: int):
        super().__init__(parent, layer_idx)
        self.sliding_window = sliding_window
        self.ring = False  # stored as a ring (else the last w - 1 tokens in stream order)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        assert self.parent.rope is not None
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.inv_freq = self.parent.rope.frequencies(self.layer_idx, self.device)
        self.is_initialized = True

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    def rolls(self, plan: StepPlan) -> bool:
        """Whether this step keeps (or puts) the layer's tokens in a ring: one new token, and the window before it
        holds real tokens only (a padding mask follows stream order)."""
        past = plan.start - (self.sliding_window - 1)
        return plan.num_new == 1 and past >= 0 and plan.real_from <= past

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Store the new (already rotated) keys/values; return the ``m + n`` keys/values of ``get_mask_sizes``."""
        plan, key_states, value_states = _receive(self, key_states, value_states)
        window = self.sliding_window
        if self.rolls(plan):
            if not self.ring:
                self._set_order(plan.start, ring=True)
            at = plan.start % window
            self.keys[:, :, at : at + 1] = key_states
            self.values[:, :, at : at + 1] = value_states
            return self.keys, self.values
        if self.ring:
            self._set_order(plan.start, ring=False)
        keys, values = torch.cat((self.keys, key_states), dim=-2), torch.cat((self.values, value_states), dim=-2)
        self.keys, self.values = keys[:, :, -(window - 1) :], values[:, :, -(window - 1) :]
        if plan.num_new > 1:  # give the chunk's room back: keep a copy of what the layer keeps, not the views
            self.keys, self.values = self.keys.clone(), self.values.clone()
        return keys, values

    def _set_order(self, start: int, ring: bool) -> None:
        """Move the ``w - 1`` tokens before stream slot ``start`` into a ring (index ``slot % w``) or out of it, in
        stream order."""
        window = self.sliding_window
        index = torch.arange(start - window + 1, start, device=self.device) % window
        if ring:
            keys, values = (t.new_zeros(*t.shape[:2], window, t.shape[-1]) for t in (self.keys, self.values))
            keys[:, :, index], values[:, :, index] = self.keys, self.values
            self.keys, self.values = keys, values
        else:
            self.keys, self.values = self.keys[:, :, index], self.values[:, :, index]
        self.ring = ring

    def rebase(self, shift: int) -> None:
        """Positions drop by ``shift``: rotate the stored keys back once (float32, one rounding)."""
        if self.is_initialized:
            self.keys.copy_(rotate(self.keys, torch.tensor(-shift, device=self.device), self.inv_freq))

    def select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.device)
            self.keys, self.values = self.keys[index], self.values[index]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the current step in the buffer numbering of ``SinkCache.mask_sizes``."""
        plan = self.parent.plan
        assert plan is not None
        kept = min(plan.start, self.sliding_window - 1)
        return kept + plan.num_new, plan.start - kept - plan.base
