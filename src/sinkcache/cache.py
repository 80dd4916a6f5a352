"""SinkCache: the StreamingLLM cache (attention sinks + a rolling window) as a transformers 5 ``Cache``.

The policy (which tokens a call attends to, at which positions) is ``policy.Policy``, stated there on one screen
and free of storage. This module stores keys and values so that every forward call sees exactly that.

Storage: each layer holds what it can attend to
-----------------------------------------------
Two layer kinds, chosen per decoder layer from the model's config (``RopeSpec.sliding_windows``):

* ``SinkLayer`` (full attention, and sliding windows long enough to reach a sink): the sinks plus the window, in one
  buffer whose keys and values sit side by side. Past the window, one token per call, it holds ``window_length + 1``
  slots (the kept tokens and the new one) plus the sinks' own copies; a chunk of ``n`` tokens takes
  ``window_length + n`` slots for that call and gives them back at the next one-token call.
* ``SlidingLayer`` (a sliding window ``w`` with ``w - 1 <= window_length - num_sink_tokens``): such a layer can never
  see a sink, so it keeps its last ``w - 1`` tokens only, as transformers' ``DynamicSlidingWindowLayer`` does.

In a ``SinkLayer`` tokens are written in stream order (until the cache rolls in place, below), so the tokens a step
attends to are always one contiguous slice: a view, never a copy, and the standard causal / sliding-window masks of
transformers apply unchanged (slot distance == in-cache distance).

* Positions are ``slot - offset``: window keys keep the rotation they were given when they arrived, and the query
  gets the next position, so their distances are right without touching them.
* The sinks are the only tokens that move: each step they are written into the ``num_sink_tokens`` slots just
  before the oldest window token, rotated in float32 from a stored float32 copy of their keys at positions
  ``0 .. num_sink_tokens - 1`` (so that one rotation moves them all; one rounding, however long the stream).
* When the new tokens do not fit, the live slice is copied back to the start of the buffer (compaction). More than
  ``window_length`` tokens apart, the offset is re-based so that positions stay below ``2 * window_length`` plus
  the call's tokens: a window key (of either layer kind) is re-rotated (float32, one rounding) at most once in its
  life. Per one-token step the work is O(sinks + 1) per layer.
* After the first step, ``SinkLayer`` s with the same storage shapes form a ``LayerGroup`` whose buffers are one
  tensor: ``begin_step`` then rotates every layer's sinks with three kernels and makes every layer's views with
  two operations, and a layer's ``update`` only writes the new keys and values (one ``index_copy_`` each, through an
  index that ``begin_step`` made once for all layers).

Rolling in place
----------------
Once every row's stream is longer than the window, one-token calls stop moving the region: it keeps its
``window_length + 1`` slots, the sinks its first ones, and each new token overwrites the slot of the token evicted
after the previous call (a ring). The attended tokens are then no longer in stream order, which attention without a
mask cannot tell: each key carries its position in its rotation, and the sum over keys does not depend on their
order. The layers' views and the sinks' slots are then the same at every step, so a step creates no views and
writes the sinks' keys only; this decode steady state has a short path of its own (``SinkCache._roll_one``), whose
sink rotation the group's first layer runs when it receives the step's keys (``LayerGroup.roll``). A
chunk (``n > 1``) first rolls the ring back into stream order (its causal mask counts slot distances), and a model
with a ``SinkLayer`` whose sliding or chunked attention window is shorter than ``window_length + 1`` never rolls
in place, for the same reason; its buffer then keeps ``slack`` spare slots, so that compaction happens once every
``slack`` tokens. Neither do static shapes: their mask follows stream order. A ``SlidingLayer`` rolls by itself in
a ring of ``w`` slots (see its docstring).

Batches may be left-padded: padding slots are masked and zeroed, never become sinks, and each row's sinks are its own
first real tokens. Padding after a row's first real token is refused.

Static shapes (``static_shapes=True``, for ``torch.compile``)
-------------------------------------------------------------
The layout and the positions are the same; only the *addressing* changes. Each step then attends to the whole
buffer (``window_length + slack`` slots) and a ``[batch, slots]`` mask hides the slots outside the live region, the
new tokens are written through an index tensor, and the query offset of the causal mask is a tensor. A one-token
step therefore has the same shapes and the same Python control flow at every step: inside the model's forward the
cache reads no Python number that changes, so a compiled decode step compiles once. Everything that does depend on
the step's numbers (the plan, moving the sinks, compaction and the position re-base) runs in ``begin_step``, before
the model's forward, outside the graph. Each layer keeps a buffer of its own here (see ``LayerGroup``), and every
layer, sliding or not, is a ``SinkLayer``: one mask serves them all. The price is attention over the slack slots too
(masked): 1.25x the keys of the default addressing, and the memory of that layout on every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from . import compat
from .ledger import TokenLedger
from .policy import Policy
from .rotary import RopeSpec, RotationTable, halves, rotate

_NO_TOKEN = 2**62  # first_real value of a row that has only seen padding
_CPU = torch.device("cpu")
TABLE_STEPS = 16  # the sinks' rotation table serves this many steps, then is rewritten (four small kernels)
RUN_STEPS = 4  # one-token steps served by one fill of their numbers' tensor (StepNumbers)


class NotEnabledError(RuntimeError):
    """A SinkCache was driven by a forward pass that did not go through ``enable_streaming``'s hook."""


@dataclass(slots=True)
class StepPlan:
    """What the layers need to apply one forward step; computed once per step by ``SinkCache.begin_step`` (in the
    decode steady state, the previous step's plan moved on in place: ``SinkCache._roll_one``).

    Slot numbers are absolute stream slots (``0, 1, ...`` over every column ever fed, padding included) unless said
    otherwise; buffer index = ``slot - base``.
    """

    start: int  # first token consumed before this step (== tokens seen so far)
    num_new: int  # tokens in this forward call
    region_start: int  # first slot attended to: the sinks of full rows start here
    base: int  # absolute slot of buffer index 0
    capacity: int  # buffer slots
    write_at: torch.Tensor  # buffer indices of the new tokens, [num_new] long
    attend: slice  # the buffer indices this step attends to (everything, with static shapes)
    new_mask: torch.Tensor | None  # [batch, num_new] bool validity of the new tokens; None when all valid
    capture: tuple[torch.Tensor, ...] | None  # new tokens that are sinks: row, sink index, column, position
    query_offset: int | torch.Tensor  # the causal mask's index of the first new token (see mask_sizes)
    real_from: int  # every row holds real tokens from this slot on (a huge number while a row has none)


class StepNumbers:
    """The numbers of a step that the model reads as tensors, on its device: the new tokens' position ids
    ``[1, n]``, their buffer indices ``[n]`` and, with static shapes, the causal mask's query offset ``[]``.

    For one token (every decode step) they are views of one small tensor kept from step to step, ``[numbers,
    RUN_STEPS]``: column ``i`` holds the numbers of the ``i``-th step of a run in which every number moves on by
    one, and its views are made once. Such a step only hands out the next column's views; the run after it is one
    ``add_``, and a step whose numbers jump (a ring's wrap, a re-base) refills the tensor with one ``arange`` per
    number. A decode step of a small model is bound by per-call costs like these (a kernel or a view per step,
    measured: see ``benchmarks/step_cost.py``). A returned tensor is valid until the tensor is refilled, at the
    latest ``RUN_STEPS`` calls later: each serves one forward call.
    """

    def __init__(self) -> None:
        self.kept: torch.Tensor | None = None  # [numbers, RUN_STEPS]: 2 numbers, or 3 with the query offset
        self.views: list[tuple[torch.Tensor, ...]] = []  # per column: the views the model takes
        self.run: list[tuple[int, ...]] = []  # per column: the numbers it holds
        self.column = RUN_STEPS  # the column handed out last
        self.device = _CPU  # where kept lives

    def __call__(self, numbers: tuple[int, ...], n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        if n > 1:
            positions, indices = (torch.arange(first, first + n, device=device) for first in numbers[:2])
            return positions[None], indices, *(torch.tensor(number, device=device) for number in numbers[2:])
        column, kept = self.column + 1, self.kept
        if column < RUN_STEPS and numbers == self.run[column] and device == self.device:  # the run goes on
            self.column = column
            return self.views[column]
        if kept is None or kept.shape[0] != len(numbers) or kept.device != device:
            kept = self.kept = torch.empty(len(numbers), RUN_STEPS, dtype=torch.long, device=device)
            self.views = [(kept[0, i : i + 1].view(1, 1), kept[1, i : i + 1], *kept[2:, i].unbind())
                          for i in range(RUN_STEPS)]
            self.run, self.device = [], device
        if self.run and numbers == tuple(number + 1 for number in self.run[-1]):  # the next run
            kept.add_(RUN_STEPS)
        else:
            for row, number in zip(kept, numbers):
                torch.arange(number, number + RUN_STEPS, out=row)
        self.run = [tuple(number + i for number in numbers) for i in range(RUN_STEPS)]
        self.column = 0
        return self.views[0]


class SlotMask:
    """Static shapes' ``[batch, capacity + 1]`` validity of the buffer's slots (column 0 is the leading, masked
    column of ``SinkCache.mask_sizes``): one tensor on the model's device, kept from step to step.

    A row's slot is valid from its first real token and from the region start on, up to the step's last new token.
    Once no row starts after the region, the valid columns are one run, the same in every row, and a one-token step
    moves it on by one: the mask is then updated in place, filling the columns that left the run and those that
    joined it (two small kernels, where building the mask takes six, and off the CPU a copy to the device).
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.run: tuple[int, int] | None = None  # the valid columns [start, stop), when they are those of every row

    def update(self, first_real: torch.Tensor, region_start: int, stop: int, base: int, capacity: int,
               uniform: bool, device: torch.device) -> torch.Tensor:
        """The mask of slots ``[region_start, stop)`` (and of each row's real ones), the buffer's index 0 at slot
        ``base``; ``uniform``: no row's first real token comes after ``region_start``."""
        mask, run = self.mask, self.run
        if mask is None or mask.shape != (first_real.shape[0], capacity + 1) or mask.device != device:
            mask = self.mask = torch.zeros(first_real.shape[0], capacity + 1, dtype=torch.bool, device=device)
            run = 0, 0
        start, end = region_start - base + 1, stop - base + 1
        if uniform and run is not None:
            if run[0] <= start <= run[1] <= end:  # the run moved on: what left it, and what joined it
                mask.narrow(1, run[0], start - run[0]).fill_(False)
                mask.narrow(1, run[1], end - run[1]).fill_(True)
            else:
                mask.fill_(False)
                mask.narrow(1, start, end - start).fill_(True)
        else:
            slots = torch.arange(base - 1, base + capacity)[None, :]
            mask.copy_((slots >= first_real[:, None].clamp(min=region_start)) & (slots < stop))
        self.run = (start, end) if uniform else None
        return mask


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

    def __init__(self, parent: SinkCache, layer_idx: int):
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

    def __init__(self, parent: SinkCache, layer_idx: int):
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

    def __init__(self, parent: SinkCache, layer_idx: int, sliding_window: int):
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


class LayerGroup:
    """Layers whose storage has the same shapes, dtype, device and rotary table, handled together.

    The cache-wide work of a step (moving the sinks, compaction, the position re-base, reordering the batch, and with
    the default addressing the views each layer attends to) is then one operation per group instead of one per
    layer. Most models have one group; Gemma 3 (two rotary tables) or a model split over devices has several.

    Storage is a list of ``units``, tensors ``[2 * layers, batch, heads, slots, width]`` holding consecutive layers:
    a layer's keys, then its values. With the default addressing one unit holds the whole group, and the layers' own
    tensors are views into it. With static shapes every layer keeps its own unit: a compiled step that wrote into
    views of one shared tensor would copy all of it (AOTAutograd's handling of aliased inputs it mutates).
    """

    def __init__(self, layers: list[SinkLayer], shared: bool, moving: bool):
        self.layers, self.moving = layers, moving
        self.pending: int | None = None  # the row of a rotation planned by roll, not yet run
        first = layers[0]
        self.table, self.inv_freq, self.dtype = first.table, first.inv_freq, first.dtype
        self.key_dim, self.value_dim = first.key_dim, first.value_dim
        self.narrow = self.key_dim != self.value_dim  # then one of the two is narrower than the storage's width
        self.rows = [slice(0, 2 * len(layers))] if shared else [slice(2 * g, 2 * g + 2) for g in range(len(layers))]
        kvs = [layer.kv for layer in layers]
        self._set([torch.cat(kvs)] if shared else kvs, torch.stack([layer.sink_keys for layer in layers]),
                  torch.stack([layer.sink_values for layer in layers]))

    def _set(self, units: list[torch.Tensor], sink_keys: torch.Tensor, sink_values: torch.Tensor,
             folded: torch.Tensor | None = None, placed: torch.Tensor | None = None) -> None:
        self.units, self.sink_keys, self.sink_values = units, sink_keys, sink_values
        if folded is None:
            # Allocated here so that the cache's size is fixed from the group's first step (SinkCache.nbytes), and
            # written when the sinks changed: the sinks' folded keys (RotationTable.fold) and, where the sinks move
            # every step (``moving``: the cache does not roll in place), this step's sinks (keys and values, rows
            # laid out as in the units), copied into each unit with one copy.
            folded = sink_keys.new_empty(*sink_keys.shape[:-1], 2, self.table.half)
            shape = (2 * len(self.layers), *units[0].shape[1:3], sink_keys.shape[-2], units[0].shape[-1])
            placed = units[0].new_zeros(shape) if self.moving else None
            self.sinks_changed = True
        self.folded, self.placed = folded, placed
        self.placed_rotary = None if placed is None else halves(placed[0::2, ..., : self.key_dim], self.table.half)
        # per unit, the sinks' keys, folded keys and values of its layers
        layers = [slice(rows.start // 2, rows.stop // 2) for rows in self.rows]
        self.sources = [(sink_keys[g], folded[g], sink_values[g]) for g in layers]
        self.attended: tuple[int, int] | None = None  # the slots of the layers' current views (see attend)
        # where write_sinks wrote last, and per unit the views it writes through (see _sink_slots)
        self.sink_slots: tuple[int, list[torch.Tensor]] = (-1, [])
        # the buffer index where the sinks' values and pass-through key dimensions were last written: rolling in
        # place they stay, and a step rotates the keys' rotary dimensions only
        self.values_at = -1
        # per unit, while the sinks' slots stay (rolling): the rotary halves of the sinks' keys, their folded keys
        # and their slots' keys
        self.rolling: list[tuple[torch.Tensor, ...]] = []
        for g, layer in enumerate(self.layers):
            layer.group = self
            kv = units[0][2 * g : 2 * g + 2] if len(units) == 1 else units[g]
            layer.point_to(kv, sink_keys[g], sink_values[g])

    def attend(self, start: int, length: int) -> None:
        """Give every layer its views of ``length`` buffer slots from ``start`` for this step (shared storage: two
        operations in all, none when the slots are those of the previous step)."""
        if self.attended == (start, length):
            return
        views = self.units[0].narrow(3, start, length).unbind(0)
        for g, layer in enumerate(self.layers):
            keys, values = views[2 * g], views[2 * g + 1]
            layer.attending = (keys[..., : self.key_dim], values[..., : self.value_dim]) if self.narrow \
                else (keys, values)
        self.attended = start, length

    def write_sinks(self, at: int, row: int, full_rows: torch.Tensor | None) -> None:
        """Put the sinks in buffer slots ``at ..`` at positions ``row ..``; only in ``full_rows`` if given.

        The keys are rotated by ``row`` from their float32 copy at positions ``0 ..`` (one rounding, however long
        the stream), for all of the group's layers at once. Rolling in place, they are rotated straight into the
        sinks' slots, which keep the values; otherwise into ``placed``, copied into each unit with its values.
        """
        half = self.table.half
        if self.sinks_changed:
            self.folded.copy_(self.table.fold(self.sink_keys))
            if self.placed is not None:  # the values, and the keys' pass-through dimensions (no rotation writes them)
                self.placed[0::2, ..., : self.key_dim] = self.sink_keys
                self.placed[1::2, ..., : self.value_dim] = self.sink_values
            self.sinks_changed = False
        rotary = halves(self.sink_keys, half)  # the dimensions a rotation reads and writes
        if full_rows is not None:  # some rows are not full yet: there, these slots hold their own tokens
            full = full_rows.to(self.sink_keys.device)[None, :, None, None, None]
            rotated = self.sink_keys.clone()
            self.table.rotate(rotary, self.folded, row, halves(rotated, half))
            for slot, rows, (_, _, sink_values) in zip(self._sink_slots(at), self.rows, self.sources):
                keys, values = slot[0::2, ..., : self.key_dim], slot[1::2, ..., : self.value_dim]
                keys.copy_(torch.where(full, rotated[rows.start // 2 : rows.stop // 2], keys))
                values.copy_(torch.where(full, sink_values, values))
            self.values_at = -1
        elif self.placed is not None:
            assert self.placed_rotary is not None
            self.table.rotate(rotary, self.folded, row, self.placed_rotary)
            for slot, rows in zip(self._sink_slots(at), self.rows):
                slot.copy_(self.placed[rows])
        else:  # rolling in place: the slots stay, and so do the views of their keys (and the values in them)
            if self.values_at != at:
                self.rolling = []
                for slot, (sink_keys, folded, sink_values) in zip(self._sink_slots(at), self.sources):
                    slot_keys = slot[0::2, ..., : self.key_dim]
                    slot[1::2, ..., : self.value_dim].copy_(sink_values)
                    slot_keys[..., 2 * half :].copy_(sink_keys[..., 2 * half :])  # pass-through: never rotated
                    self.rolling.append((halves(sink_keys, half), folded, halves(slot_keys, half)))
                self.values_at = at
            self.table.rotate_into(self.rolling, row)

    def roll(self, at: int, row: int, length: int) -> None:
        """One step rolling in place: the sinks' keys rotated in their slots from buffer index ``at`` to the
        positions from ``row``, every layer attending to the ``length`` slots from ``at``. Once the slots' views are
        made (first step, or re-made since: rows selected, sinks captured, slots moved), that is three kernels, which
        the group's first layer runs when it receives the step's keys, before its attention reads them: right
        after the model's own rotary kernels, they cost less than in the hook (measured on the tiny model, 1.3 % of
        a step)."""
        if self.values_at == at and self.attended == (at, length):
            if self.rolling:
                self.pending = row  # rotated by the group's first layer to receive the step (see rotate_pending)
            return
        if self.sink_keys.shape[-2]:
            self.write_sinks(at, row, None)
        self.attend(at, length)

    def rotate_pending(self) -> None:
        """Rotate the sinks as ``roll`` planned for this step (once; every layer of the group then sees them)."""
        if self.pending is not None:
            self.table.rotate_into(self.rolling, self.pending)
            self.pending = None

    def _sink_slots(self, at: int) -> list[torch.Tensor]:
        """Every unit's view of the sinks' slots from buffer index ``at``; kept while ``at`` stays (rolling)."""
        if self.sink_slots[0] != at:
            self.sink_slots = at, [unit.narrow(3, at, self.sink_keys.shape[-2]) for unit in self.units]
        return self.sink_slots[1]

    def unroll(self, start: int, length: int, shift: int) -> None:
        """Back to stream order: roll the ``length`` slots from ``start`` (a ring) left by ``shift``."""
        if shift:
            for unit in self.units:
                ring = unit.narrow(3, start, length)
                ring.copy_(ring.roll(-shift, 3))

    def relocate(self, src: slice, capacity: int) -> None:
        """Compaction (and growth or shrinking): move the slots ``src`` to the start of a buffer of ``capacity``."""
        live = src.stop - src.start
        if capacity == self.units[0].shape[-2]:
            for unit in self.units:
                unit[..., :live, :] = unit[..., src, :].clone()
            self.values_at = -1
            return
        units = []
        for unit in self.units:
            units.append(unit.new_zeros(*unit.shape[:-2], capacity, unit.shape[-1]))
            units[-1][..., :live, :] = unit[..., src, :]
        self._set(units, self.sink_keys, self.sink_values, self.folded, self.placed)

    def rebase(self, live: slice, shift: int) -> None:
        """Positions drop by ``shift``: rotate the live window keys back once (float32, one rounding)."""
        for unit in self.units:
            keys = unit[0::2, :, :, live, : self.key_dim]
            keys.copy_(rotate(keys, torch.tensor(-shift, device=keys.device), self.inv_freq))

    def select_rows(self, index: torch.Tensor) -> None:
        index = index.to(self.units[0].device)
        self._set([unit[:, index] for unit in self.units], self.sink_keys[:, index], self.sink_values[:, index])


NOT_ENABLED = (
    "SinkCache received keys from a forward pass it was not prepared for. Call sinkcache.enable_streaming(model) "
    "once before using a SinkCache: it assigns the positions inside the cache that the model needs."
)
INTERRUPTED = "A previous forward pass on this SinkCache did not finish; call cache.reset()."
GRAD_MODE = (
    "SinkCache does not support gradients: its keys and values are updated in place as the stream moves on. Wrap "
    "the forward calls in `with torch.no_grad():` or `with torch.inference_mode():` (generate() already runs "
    "without gradients), or freeze the model with model.requires_grad_(False)."
)


class SinkCache(Cache):
    """A KV cache that keeps the first ``num_sink_tokens`` tokens forever plus a rolling window of recent tokens.

    Args:
        window_length: total number of cached tokens, sinks included (as in transformers' former SinkCache).
        num_sink_tokens: how many of the stream's first tokens are kept forever (the attention sinks).
        static_shapes: attend to the whole buffer through a mask, so that every one-token step has the same shapes
            and a ``torch.compile``d model (or decoder) compiles its decode step once. Same positions and outputs;
            about 1.25x the attention keys. ``generate`` does not compile by itself (``is_compileable`` is False).

    Use it through ``sinkcache.enable_streaming(model)``, which installs the hook that gives each forward call
    its positions and mask from ``begin_step``. See the module docstring for the exact position contract.
    """

    def __init__(self, window_length: int = 1024, num_sink_tokens: int = 4, *, static_shapes: bool = False):
        for name, value in (("window_length", window_length), ("num_sink_tokens", num_sink_tokens)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SinkCache {name} must be an int, got {type(value).__name__} {value!r}.")
            if value < 0:
                raise ValueError(f"SinkCache {name} must be >= 0, got {value}.")
        if window_length <= num_sink_tokens:
            raise ValueError(
                f"SinkCache window_length ({window_length}) must be larger than num_sink_tokens ({num_sink_tokens}): "
                "it counts the sinks plus at least one recent token. Increase window_length."
            )
        if not isinstance(static_shapes, bool):
            raise TypeError(f"SinkCache static_shapes must be True or False, got {static_shapes!r}.")
        super().__init__(layers=[])
        self.layers: list[SinkLayer | SlidingLayer]  # type: ignore[assignment]  # made by begin_step (or update)
        self.window_length = window_length
        self.num_sink_tokens = num_sink_tokens
        self.policy = Policy(window_length, num_sink_tokens)
        self.static_shapes = static_shapes
        self.slack = max(16, window_length // 4)  # compaction every `slack` tokens copies the window once
        # spare slots of a full-attention layer's buffer past the window: `slack` while the region moves through it;
        # 1 (the new token) when one-token calls roll it in place, where compaction never happens (see _read_rope)
        self.spare = self.slack
        self.rolls_in_place = False
        self.rope: RopeSpec | None = None
        self._limit = 0  # positions of one-token calls stay below this (_position_limit; set with the rope)
        # (inv_freq, its table) by (id(inv_freq), device); holding inv_freq keeps its id from being reused
        self._tables: dict[tuple[int, torch.device], tuple[torch.Tensor, RotationTable]] = {}
        self._inference_tensors = False  # a step ran under torch.inference_mode(): see _leave_inference_mode
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the cache can then serve a new one (any batch size) on the same model.

        The layers are replaced by as many new, empty ones (transformers' ``Cache.reset`` loops over the layer count
        while each layer's ``reset`` resets the whole cache)."""
        self.layers = [self._new_layer(i) for i in range(len(self.layers))]
        self.seen = 0  # columns fed so far, padding included (what generate() calls the sequence length)
        self.base = 0
        self.offset = 0
        self.plan: StepPlan | None = None
        self.stepping = False  # from begin_step until end_step: the model's forward of the planned step runs
        # steps planned; layers initialized; layers that stored the current step's keys (all ready ones, once done)
        self.steps = self.ready = self.received = 0
        # rolling in place: (buffer index of the region, stream slot of the token stored first in its ring)
        self.ring: tuple[int, int] | None = None
        self.first_real: torch.Tensor | None = None  # [batch] absolute slot of each row's first real token
        self._first_min = self._first_max = _NO_TOKEN  # its extremes, as ints for the per-step fast path
        self._rows = -1  # its length: the stream's batch size
        # the one-token calls' position ids and write indices, refilled in place, and the slot mask (_new_step_tensors)
        self._new_step_tensors()
        self.groups: list[LayerGroup] = []  # formed at the second step, when every layer has its storage
        self._grouped = False
        self.ledger = TokenLedger()  # what the stream consumed, for generate()'s prefix check (sinkcache.ledger)

    def __repr__(self) -> str:
        return (f"SinkCache(window_length={self.window_length}, num_sink_tokens={self.num_sink_tokens}, "
                f"static_shapes={self.static_shapes}, seen={self.seen}, layers={len(self.layers)})")

    # ---- the policy: one step ------------------------------------------------------------------------------
    def begin_step(self, batch: int, num_new: int, new_mask: torch.Tensor | None, rope: RopeSpec,
                   device: torch.device = _CPU) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plan the next forward call, compact or re-base the stored layers, and return the model's inputs.

        Args:
            batch: rows of the call's input ids.
            num_new: columns (tokens) of the call's input ids.
            new_mask: ``[batch, num_new]`` bool, which new columns are real tokens (False = padding), or ``None`` when
                all are.
            rope: the model's rotary spec; a cache serves one model only.
            device: where the model's inputs live.

        Returns:
            ``position_ids`` ``[batch, num_new]`` (long, on ``device``) and a 2D validity mask over the buffer from
            index 0 to the last attended one (CPU, bool), or ``None`` when every attended slot is valid. With static
            shapes the mask covers the whole buffer, on ``device``, and the next step updates it in place.
        """
        if new_mask is not None and bool(new_mask.all()):
            new_mask = None  # every new column is a real token
        if self._steady(batch, num_new, new_mask, rope):
            return self._roll_one(batch, device)
        if rope is not self.rope:
            if self.rope is not None and self.rope.model_id != rope.model_id:
                raise ValueError("This SinkCache was used with another model; create one SinkCache per model.")
            self._read_rope(rope)
        if torch.is_inference_mode_enabled():
            self._inference_tensors = True
        elif self._inference_tensors:
            self._leave_inference_mode()
        if self.received != self.ready:  # a layer did not store the previous step's keys
            raise RuntimeError(INTERRUPTED)
        n = num_new
        if n < 1:
            raise ValueError("SinkCache: a forward call must contain at least one token.")
        new_mask = self._track_rows(batch, n, new_mask)
        assert self.first_real is not None
        t, window, sinks = self.seen, self.window_length, self.num_sink_tokens
        region_start = self.policy.region_start(t)  # full rows: sinks here, window [region_start + sinks, t)

        groups, default = self._group_layers(), window + self.spare
        ring_size = window + 1 - sinks  # rolling in place: the slots of the window and the new token
        if self.ring is not None:  # the region keeps its buffer slots: the stream slot of buffer index 0 moves on
            at, origin = self.ring
            self.base = region_start - at
            if n > 1:  # a chunk needs stream order (the causal mask within it): unroll the ring first
                for group in groups:
                    group.unroll(at + sinks, ring_size, (region_start + sinks - origin) % ring_size)
                self.ring = None

        # Compaction when the new tokens do not fit; a chunk larger than the spare slots grows the buffer to the window
        # plus itself, and the next call that fits the default size shrinks it back.
        old_base, old_capacity = self.base, groups[0].units[0].shape[-2] if groups else default
        base, capacity = old_base, old_capacity
        if t + n - base > capacity or (capacity > default and t + n - region_start <= default):
            base, capacity = region_start, max(default, t + n - region_start)
        # Re-base positions when the next query would pass the limit (float32 precision, length-dependent RoPE).
        # Re-bases are then more than `window` slots apart, longer than any window key lives: one re-rotation each.
        limit = self._position_limit(rope, n)
        shift = 0
        if t + n - self.offset > limit:
            shift, self.offset = region_start - self.offset, region_start

        capture: tuple[torch.Tensor, ...] | None = None
        if t < self._first_max + sinks:  # some row's first tokens arrive now: keep them as its sinks
            sink_slot = self.first_real[:, None] + torch.arange(sinks)[None, :]  # policy.sink_slots, row by row
            rows, ids = ((sink_slot >= t) & (sink_slot < t + n)).nonzero(as_tuple=True)
            if len(rows):
                slots = sink_slot[rows, ids]
                capture = (rows, ids, slots - t, slots - self.offset)
        lo, now = region_start - base, t - base
        # Roll in place once every row is full, unless a layer's sliding or chunked window (a mask over slot
        # distances) would cut the region. The region stays at its current slots from now on.
        if self.ring is None and n == 1 and self._first_max < region_start and self.rolls_in_place:
            self.ring = lo, region_start + sinks
        query_offset: int | torch.Tensor
        if self.static_shapes:
            attend = slice(None)  # the query offset is now + 1: see mask_sizes
            position_ids, write_at, query_offset = self._numbers((t - self.offset, now, now + 1), n, device)
        else:
            attend, query_offset = slice(lo, now + n), now
            # the new token takes the slot of the token evicted after the previous call when rolling in place
            first = now if self.ring is None else self._ring_slot(t)
            position_ids, write_at = self._numbers((t - self.offset, first), n, device)
        self.plan = StepPlan(
            start=t, num_new=n, region_start=region_start, base=base, capacity=capacity, write_at=write_at,
            attend=attend, new_mask=new_mask, capture=capture, query_offset=query_offset, real_from=self._first_max,
        )

        # Rows are "full" once their stream outgrew the window: their sinks move to region_start every step, at
        # positions region_start - offset + j (<= window_length + j: see rotation_table).
        some_full = sinks > 0 and self.policy.is_full(t, self._first_min)
        full_rows = self.first_real < region_start if some_full and self._first_max >= region_start else None
        for group in groups:
            if base != old_base or capacity != old_capacity:
                group.relocate(slice(region_start - old_base, t - old_base), capacity)
            if shift:  # up to the new tokens' slots: rolling in place, the last one may hold a window token
                group.rebase(slice(lo, now + n), shift)
            if some_full:
                group.write_sinks(lo, region_start - self.offset, full_rows)
            if not self.static_shapes:  # with static shapes a layer attends to its whole unit
                group.attend(lo, now + n - lo)
        for layer in self.sliding_layers if shift else ():
            layer.rebase(shift)
        self._planned()
        self.base, self.seen, self.stepping = base, t + n, True

        if batch > 1:
            position_ids = position_ids.expand(batch, n).clone()
        if self.static_shapes:  # the whole buffer is attended: hide what lies outside the live region
            uniform = self._first_max <= region_start
            return position_ids, self._slot_mask.update(self.first_real, region_start, t + n, base, capacity, uniform,
                                                        device)
        if self._first_max <= region_start:  # every attended slot holds a real token
            return position_ids, None
        return position_ids, torch.arange(base, t + n)[None, :] >= self.first_real[:, None]

    def _position_limit(self, rope: RopeSpec, n: int) -> int:
        """Positions of a call of ``n`` tokens stay below this (a re-base happens before they would not): twice the
        window plus the call, and never past the longest context of a length-dependent RoPE."""
        window = self.window_length
        if rope.max_position is None:
            return 2 * window + n
        if window + n > rope.max_position:
            raise ValueError(
                f"window_length ({window}) + tokens per call ({n}) exceed {rope.max_position}, the longest "
                "context at which this model's length-dependent RoPE keeps fixed frequencies. Use a smaller "
                "window_length or feed fewer tokens per call."
            )
        return min(2 * window + n, rope.max_position)

    def _ring_slot(self, t: int) -> int:
        """Rolling in place, the buffer index of stream slot ``t``'s token: the slot of the window token evicted
        after the previous call."""
        assert self.ring is not None
        at, origin = self.ring
        return at + self.num_sink_tokens + (t - origin) % (self.window_length + 1 - self.num_sink_tokens)

    def _steady(self, batch: int, num_new: int, new_mask: torch.Tensor | None, rope: RopeSpec) -> bool:
        """Whether ``_roll_one`` serves the step: one real token per row of the same batch, for the same model, while
        rolling in place, with no re-base due and nothing that the general path's checks would act on (an
        interrupted step, entering or leaving ``torch.inference_mode()``)."""
        return (self.ring is not None and num_new == 1 and new_mask is None and rope is self.rope
                and batch == self._rows and self.received == self.ready and self.seen + 1 - self.offset <= self._limit
                and torch.is_inference_mode_enabled() == self._inference_tensors)

    def _roll_one(self, batch: int, device: torch.device) -> tuple[torch.Tensor, None]:
        """``begin_step`` for the decode steady state (see ``_steady``), reduced to what changes from step to step
        (``tests/test_positions.py`` checks that it gives what the general path gives, bit for bit).

        Nothing is relocated (the ring keeps its ``window_length + 1`` slots from buffer index ``at``, which fit
        since the step that formed it), no row gets sinks (every row is full) and the layers' views stay. The
        region moves on by one slot: the new token takes the slot of the token evicted after the previous call, and
        the sinks are rotated to their next positions. A decode step of a small model is bound by per-call costs,
        so this is written flat: no call that the step does not need (measured: ``benchmarks/step_cost.py``).
        """
        assert self.ring is not None and self.plan is not None
        t, at, plan = self.seen, self.ring[0], self.plan
        region_start = t - self.window_length  # policy.region_start for t > window_length
        base = region_start - at
        position_ids, write_at = self._numbers((t - self.offset, self._ring_slot(t)), 1, device)
        # The previous step's plan is one of the ring too (one token, no sinks to capture, no padding, the ring's
        # slots attended): these are the only fields that move on, and updating them costs less than a new plan.
        plan.start, plan.region_start, plan.base, plan.write_at, plan.query_offset = t, region_start, base, write_at, \
            t - base
        row = region_start - self.offset
        for group in self.groups:
            group.roll(at, row, self.window_length + 1)
        self._planned()
        self.base, self.seen, self.stepping = base, t + 1, True
        return (position_ids if batch == 1 else position_ids.expand(batch, 1).clone()), None

    def _planned(self) -> None:
        """A step is planned: every layer stores its keys once in it (see ``_receive``)."""
        self.steps += 1
        self.received = 0

    def _leave_inference_mode(self) -> None:
        """The stream goes on outside ``torch.inference_mode()``, where inference tensors cannot be updated in place:
        replace each one the cache holds, once, by a normal copy with the same values, and re-make the views."""
        self._rebuild(lambda t: t.clone() if t.is_inference() else t)
        self._inference_tensors = False

    def _rebuild(self, own: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Re-make every view the cache relies on from the tensors they view (each passed through ``own`` first):
        the layers' storage views of their group's units (``LayerGroup._set``), or of their own buffers before the
        groups form, and the cached views (attended slices, sinks' slots, rotation runs) and step tensors."""
        for group in self.groups:
            folded, changed = own(group.folded), group.sinks_changed
            placed = None if group.placed is None else own(group.placed)
            group._set([own(unit) for unit in group.units], own(group.sink_keys), own(group.sink_values), folded,
                       placed)
            group.sinks_changed = changed
        for layer in self.layers:
            if isinstance(layer, SlidingLayer):
                if layer.is_initialized:
                    layer.keys, layer.values = own(layer.keys), own(layer.values)
                continue
            layer.attending = None
            if layer.is_initialized and layer.group is None:
                layer.point_to(own(layer.kv), own(layer.sink_keys), own(layer.sink_values))
        for _, table in self._tables.values():
            table.allocate()
            table._build(table.first)
        self._new_step_tensors()
        if self.first_real is not None:
            self.first_real = own(self.first_real)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling restores every tensor but not which ones share storage (pickle writes each view as a tensor of
        its own), so the views are re-made from the unpickled bases. ``copy.deepcopy`` comes here too, harmlessly.
        The copy keeps ``rope`` (and its ``model_id``): it serves the same model only, in the same process."""
        self.__dict__.update(state)
        self._rebuild(lambda t: t)

    def _group_layers(self) -> list[LayerGroup]:
        """The groups of the full-attention layers; formed once, after the first step has given them storage."""
        if not self._grouped and any(layer.is_initialized for layer in self.layers):
            by_signature: dict[tuple, list[SinkLayer]] = {}
            for layer in self.layers:
                if isinstance(layer, SinkLayer) and layer.is_initialized:
                    by_signature.setdefault(layer.signature(), []).append(layer)
            self.groups = [LayerGroup(layers, shared=not self.static_shapes, moving=not self.rolls_in_place)
                           for layers in by_signature.values()]
            self._grouped = True
        return self.groups

    def _new_layer(self, layer_idx: int) -> SinkLayer | SlidingLayer:
        """The storage kind of decoder layer ``layer_idx``: a ``SlidingLayer`` where its sliding window cannot reach
        a sink (and the addressing is the default one), else a ``SinkLayer`` (``StaticSinkLayer`` with static
        shapes)."""
        window = self._own_window(layer_idx)
        if window is not None:
            return SlidingLayer(self, layer_idx, window)
        return StaticSinkLayer(self, layer_idx) if self.static_shapes else SinkLayer(self, layer_idx)

    def _own_window(self, layer_idx: int) -> int | None:
        """The sliding window of layer ``layer_idx`` if the layer keeps a storage of that size, else ``None``."""
        windows = self.rope.sliding_windows if self.rope is not None else ()
        window = windows[layer_idx] if layer_idx < len(windows) else None
        if window is None or self.static_shapes or not 2 <= window <= self.window_length - self.num_sink_tokens + 1:
            return None
        return window

    def _read_rope(self, rope: RopeSpec) -> None:
        """Take the model's rotary spec, make its layers and decide whether the full-attention layers may roll in
        place: not where one of them has a sliding or chunked window (a mask over slot distances) that is shorter
        than the ``window_length + 1`` slots a step attends to."""
        self.rope = rope
        while len(self.layers) < len(rope.inv_freq_per_layer):
            self.layers.append(self._new_layer(len(self.layers)))
        if rope.sliding_windows:
            windows = [w for i, w in enumerate(rope.sliding_windows) if w is not None and self._own_window(i) is None]
            local = min([*windows, *([rope.attention_chunk] if rope.attention_chunk else [])], default=None)
        else:  # which layers slide is not known: any of them may
            local = rope.local_window
        self.rolls_in_place = not self.static_shapes and (local is None or local > self.window_length)
        self.spare = 1 if self.rolls_in_place else self.slack
        self._limit = self._position_limit(rope, 1)  # for _steady

    @property
    def sliding_layers(self) -> list[SlidingLayer]:
        return [layer for layer in self.layers if isinstance(layer, SlidingLayer)]

    def _new_step_tensors(self) -> None:
        """Fresh tensors of the one-token steps' position ids, write indices and (static shapes) query offset (see
        ``StepNumbers``), and a fresh slot mask of static shapes."""
        self._numbers = StepNumbers()
        self._slot_mask = SlotMask()

    def _track_rows(self, batch: int, n: int, new_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Record where each row's real tokens start (left padding); refuse padding after a real token.

        ``new_mask`` is ``None`` when every new column is a real token (``begin_step`` checks). Returns the new
        columns' validity on the CPU, or ``None`` when all of them are real tokens.
        """
        if self.first_real is not None and self.first_real.shape[0] != batch:
            raise ValueError(
                f"This SinkCache holds a stream of batch size {self.first_real.shape[0]}, but got batch size {batch}. "
                "Call cache.reset() or create a new SinkCache for a new batch."
            )
        if new_mask is not None:
            new_mask = new_mask.to("cpu", torch.bool)
        if new_mask is None and self._first_max < _NO_TOKEN:
            return None  # steady state: every row started, no padding
        t = self.seen
        valid = torch.ones(batch, n, dtype=torch.bool) if new_mask is None else new_mask
        first_real = self.first_real if self.first_real is not None else torch.full((batch,), _NO_TOKEN)
        first_new = torch.where(valid.any(1), valid.long().argmax(1), n)  # argmax: first True
        first_real = torch.where(first_real < _NO_TOKEN, first_real,
                                 torch.where(first_new < n, t + first_new, _NO_TOKEN))
        if bool(((torch.arange(t, t + n)[None, :] >= first_real[:, None]) & ~valid).any()):
            raise ValueError(
                "SinkCache supports left padding only: a row has padding after its first real token. Pad each "
                "sequence on the left of its first call, or stream the rows separately."
            )
        self._set_first_real(first_real)
        return new_mask

    def _set_first_real(self, first_real: torch.Tensor) -> None:
        """Store each row's first real slot, with its extremes as ints for the per-step fast path."""
        self.first_real, self._rows = first_real, first_real.shape[0]
        self._first_min, self._first_max = int(first_real.min()), int(first_real.max())

    def rotation_table(self, inv_freq: torch.Tensor) -> RotationTable:
        """The table of sink rotations for one frequency set, built on first use.

        Sinks sit at positions ``region_start - offset + j``, one further every step: their rotation by
        ``region_start - offset`` takes one row per step, and a table of ``TABLE_STEPS`` rows serves as many steps.
        """
        key = (id(inv_freq), inv_freq.device)
        entry = self._tables.get(key)
        if entry is None or entry[0] is not inv_freq:  # a copied cache's keys name objects of the original
            table = RotationTable(inv_freq, TABLE_STEPS)
            entry = self._tables[key] = inv_freq, table
        return entry[1]

    def mask_sizes(self) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the current step, in buffer slots (see ``Cache.get_mask_sizes``)."""
        if self.plan is None:
            raise NotEnabledError("SinkCache has no planned step; call sinkcache.enable_streaming(model) first.")
        plan = self.plan
        if self.static_shapes:
            # Buffer index i is numbered i + 1 in the mask (and the 2D mask has a leading, masked column): at query
            # offset 0, transformers would take a partly filled buffer for an empty static cache and drop the mask.
            return plan.capacity, 1
        return plan.start + plan.num_new - plan.region_start, plan.region_start - plan.base

    # ---- transformers Cache interface -----------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far (padding columns included); the cache itself holds at most ``window_length``.

        While a step runs on a transformers whose causal mask reads its query index from here (5.4-5.13), this is
        the query's buffer index instead, what ``get_query_offset`` says on later releases (see ``compat``).
        """
        if self.stepping and compat.QUERY_OFFSET_FROM_SEQ_LENGTH:
            return self.get_query_offset()  # type: ignore[return-value]  # a tensor with static shapes, as StaticCache's
        return self.seen

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int) -> tuple[int, int]:
        if self.plan is None:  # before any step (e.g. generate probing a fresh cache)
            # transformers 5.0-5.3 pass the query's cache_position tensor instead of its length
            return (query_length.shape[0] if isinstance(query_length, torch.Tensor) else query_length), 0
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], SlidingLayer):
            return self.layers[layer_idx].get_mask_sizes(query_length)  # type: ignore[arg-type]
        return self.mask_sizes()

    def get_query_offset(self, layer_idx: int = 0) -> int | torch.Tensor:  # type: ignore[override]
        """Buffer index of the first new token: the causal mask compares it with the key slots' indices.

        A tensor with static shapes, so that a compiled step does not specialise on it (as transformers' StaticCache).
        """
        if self.plan is None:
            return 0
        return self.plan.query_offset

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def query_indices(self, device: torch.device) -> torch.Tensor:
        """The new tokens' indices in the causal mask (``get_query_offset`` onwards): the ``cache_position`` that
        transformers 5.0-5.3 build their mask from."""
        assert self.plan is not None
        return self.plan.query_offset + torch.arange(self.plan.num_new, device=device)

    def rotate_pending(self) -> None:
        """Run the sinks' rotations that this step planned for its layers' updates now (a compiled forward plans
        outside its graph, which must not depend on the step's positions)."""
        for group in self.groups:
            group.rotate_pending()

    def end_step(self) -> None:
        """The model's forward of the planned step has returned (called by the hook where ``compat`` needs it)."""
        self.stepping = False

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (buffers, the sinks' copies and folded keys, the sliding layers'
        tokens, rotation tables, the one-token calls' position ids and indices, the slot mask of static shapes, each
        row's first real slot), each storage counted once."""
        tensors = [t for group in self.groups
                   for t in (*group.units, group.sink_keys, group.sink_values, group.folded, group.placed)
                   if t is not None]
        for layer in self.layers:
            if isinstance(layer, SlidingLayer):
                tensors += [layer.keys, layer.values] if layer.is_initialized else []
            elif layer.is_initialized and layer.group is None:
                tensors += [layer.kv, layer.sink_keys, layer.sink_values]
        tensors += [t for _, table in self._tables.values() for t in table.tensors()]
        tensors += [t for t in (self._numbers.kept, self._slot_mask.mask, self.first_real) if t is not None]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    def cached_length(self) -> int:
        """Tokens held after the last step's eviction, i.e. what the next token will attend to (<= window)."""
        return min(self.seen, self.window_length)

    def _select_rows(self, index: torch.Tensor) -> None:
        self.ledger.select_rows(index)
        if self.first_real is not None:
            self._set_first_real(self.first_real[index.cpu()])
        for group in self._group_layers():
            group.select_rows(index)
        for layer in self.sliding_layers:
            layer.select_rows(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.first_real is not None:
            self._select_rows(torch.arange(self.first_real.shape[0]).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        StreamLayer.crop(self, tokens_to_remove)  # type: ignore[arg-type]  # the same refusal

    @property
    def is_compileable(self) -> bool:
        # Even with static shapes: for a "compileable" cache, generate() builds the 4D mask itself before the forward
        # (from the previous step's sizes), which would bypass the slot mask. Compile the model or its decoder instead.
        return False
