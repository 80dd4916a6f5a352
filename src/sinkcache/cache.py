"""SinkCache: the StreamingLLM cache (attention sinks + a rolling window) as a transformers 5 ``Cache``.

Position contract
-----------------
Before token ``t`` is processed the cache holds the stream's first ``num_sink_tokens`` tokens and the most recent
``window_length - num_sink_tokens`` tokens before ``t``. Token ``t`` attends to those and to itself and is queried at
position ``L`` (the number of cached tokens); cached token ``j`` (in stream order) sits at position ``j``: exactly as
if the kept tokens had been re-encoded contiguously. Then the oldest non-sink token is evicted.

A forward call with ``n > 1`` new tokens (a chunk) evicts nothing while it runs: chunk token ``i`` sees the ``L``
cached tokens plus chunk tokens ``0..i``, at positions ``0..L+i``; eviction back to ``window_length`` happens before
the next call. With one token per call this is the contract above.

Storage (why it is cheap)
-------------------------
Each layer owns one preallocated buffer per key/value of ``window_length + slack`` slots, and tokens are written in
stream order, so the tokens a step attends to are always one contiguous slice: a view, never a copy, and the
standard causal / sliding-window masks of transformers apply unchanged (slot distance == in-cache distance).

* Positions are ``slot - offset``: window keys keep the rotation they were given when they arrived, and the query
  gets the next position, so their distances are right without touching them.
* The sinks are the only tokens that move: each step they are written into the ``num_sink_tokens`` slots just
  before the oldest window token, rotated in float32 from a stored copy of their *unrotated* keys (one rounding,
  however long the stream). With the default addressing they are rotated for 8 placements at once, then copied.
* Every ``slack`` tokens the live slice is copied back to the start of the buffer (compaction). More than
  ``window_length`` tokens apart, the offset is re-based so that positions stay below ``2 * window_length`` plus
  the call's tokens: a window key is re-rotated (float32, one rounding) at most once in its life.
  Per token the amortised work is O(sinks + 1).

Batches may be left-padded: padding slots are masked and zeroed, never become sinks, and each row's sinks are its own
first real tokens. Padding after a row's first real token is refused.

Static shapes (``static_shapes=True``, for ``torch.compile``)
-------------------------------------------------------------
The layout and the positions are the same; only the *addressing* changes. Each step then attends to the whole
buffer (``window_length + slack`` slots) and a ``[batch, slots]`` mask hides the slots outside the live region, the
new tokens and the sinks are written through index tensors, and the query offset of the causal mask is a tensor.
A one-token step therefore has the same shapes and the same Python control flow at every step: inside the model's
forward the cache reads no Python number that changes, so a compiled decode step compiles once. Everything that
does depend on the step's numbers (the plan, compaction and the position re-base, which touch every layer once per
``slack`` or ``window_length`` tokens) runs in ``begin_step``, before the model's forward, outside the graph.
The price is attention over the slack slots too (masked): 1.25x the keys of the default addressing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .rotary import RopeSpec, RotationTable, rotate

_NO_TOKEN = 2**62  # first_real value of a row that has only seen padding
SINKS_AHEAD = 8  # default addressing: the sinks are rotated for this many steps at once, then copied per step


class NotEnabledError(RuntimeError):
    """A SinkCache was driven by a forward pass that did not go through ``enable_streaming``'s hook."""


@dataclass(slots=True)
class StepPlan:
    """Everything a layer needs to apply one forward step; computed once per step by ``SinkCache.begin_step``.

    Slot numbers are absolute stream slots (``0, 1, ...`` over every column ever fed, padding included) unless said
    otherwise. The ``*_at`` fields address a layer's buffer (buffer index ``slot - base``) and are slices with the
    default addressing, index tensors on the model's device with static shapes: a layer uses them the same way.
    """

    start: int  # first token consumed before this step (== tokens seen so far)
    num_new: int  # tokens in this forward call
    region_start: int  # first slot attended to: the sinks of full rows start here
    base: int  # absolute slot of buffer index 0
    capacity: int  # buffer slots
    write_at: slice | torch.Tensor  # buffer indices of the new tokens
    sinks_at: slice | torch.Tensor  # buffer indices of the sinks of full rows
    sink_rows: slice | torch.Tensor  # rows of the rotation table that move the sinks to their positions
    attend: slice  # the buffer indices this step attends to (everything, with static shapes)
    some_full: bool  # some row's stream outgrew the window: its sinks must be written
    all_full: bool  # ... every row's
    full_rows: torch.Tensor | None  # [batch] bool, which rows, when some but not all are full
    new_mask: torch.Tensor | None  # [batch, num_new] bool validity of the new tokens; None when all valid
    capture: tuple[torch.Tensor, ...] | None  # new tokens that are sinks: row, sink index, column, position
    query_offset: int | torch.Tensor  # the causal mask's index of the first new token (see mask_sizes)


class SinkLayer(CacheLayerMixin):
    """One decoder layer's storage. It holds no policy: it applies the ``StepPlan`` of its parent ``SinkCache``."""

    is_compileable = False  # see SinkCache.is_compileable
    is_croppable = False
    is_sliding = False
    # set by lazy_initialization, before any use (the base class declares them Optional)
    keys: torch.Tensor
    values: torch.Tensor
    sink_keys: torch.Tensor  # [batch, heads, sinks, head_dim] float32, unrotated
    sink_values: torch.Tensor
    inv_freq: torch.Tensor
    table: RotationTable

    def __init__(self, parent: SinkCache, layer_idx: int):
        super().__init__()
        self.parent = parent
        self.layer_idx = layer_idx
        self.pending = False  # begin_step sets it; update clears it: a layer still pending missed a step
        self.ahead: torch.Tensor | None = None  # the sinks rotated to several consecutive placements
        self.ahead_start = 0  # the rotation-table row of ahead[0]'s first sink

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        plan, parent = self.parent.plan, self.parent
        assert plan is not None and parent.rope is not None
        batch, heads, _, head_dim = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states.new_zeros(batch, heads, plan.capacity, head_dim)
        self.values = value_states.new_zeros(batch, heads, plan.capacity, value_states.shape[-1])
        sinks = parent.num_sink_tokens
        self.sink_keys = key_states.new_zeros(batch, heads, sinks, head_dim, dtype=torch.float32)
        self.sink_values = value_states.new_zeros(batch, heads, sinks, value_states.shape[-1])
        self.inv_freq = parent.rope.frequencies(self.layer_idx, self.device)
        self.table = parent.rotation_table(self.inv_freq, head_dim)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Store the new (already rotated) keys/values and return the keys/values this step attends to.

        Returns views of the buffer, ``[batch, heads, slots, head_dim]`` in stream order: the slots of
        ``plan.attend``, i.e. the live region (sinks first) or, with static shapes, the whole buffer.
        """
        plan = self.parent.plan
        if not self.is_initialized:
            if plan is None:
                raise NotEnabledError(NOT_ENABLED)
            if plan.start != 0:  # a layer first seen after the first step missed the stream's first tokens
                raise RuntimeError(INTERRUPTED)
            self.lazy_initialization(key_states, value_states)
        elif not self.pending:
            raise NotEnabledError(NOT_ENABLED)
        self.pending = False
        assert plan is not None
        if key_states.shape[0] != self.keys.shape[0] or key_states.shape[-2] != plan.num_new:
            raise ValueError(
                f"SinkCache layer {self.layer_idx} expected keys for batch {self.keys.shape[0]} and "
                f"{plan.num_new} tokens, got {tuple(key_states.shape)}."
            )
        if plan.some_full:
            self._write_sinks(plan)
        if plan.new_mask is not None:  # zero padding so that nothing (not even NaN) leaks from masked slots
            keep = plan.new_mask.to(self.device)[:, None, :, None]
            key_states = key_states.masked_fill(~keep, 0)
            value_states = value_states.masked_fill(~keep, 0)
        if plan.capture is not None:
            self._capture_sinks(plan.capture, key_states, value_states)
        self.keys[:, :, plan.write_at] = key_states
        self.values[:, :, plan.write_at] = value_states
        return self.keys[:, :, plan.attend], self.values[:, :, plan.attend]

    def _write_sinks(self, plan: StepPlan) -> None:
        """Put every full row's sinks just before its oldest window token, at their in-cache positions."""
        where = plan.sinks_at
        if plan.all_full:  # the common case
            if isinstance(plan.sink_rows, slice):  # a copy from a batch rotated for this and the next steps
                self.keys[:, :, where] = self._sinks_rotated_from(plan.sink_rows.start)
            else:
                self.keys[:, :, where] = self.table.rotate(self.sink_keys, plan.sink_rows).to(self.dtype)
            self.values[:, :, where] = self.sink_values
        else:
            assert plan.full_rows is not None
            full = plan.full_rows.to(self.device)[:, None, None, None]
            sink_keys = self.table.rotate(self.sink_keys, plan.sink_rows).to(self.dtype)
            self.keys[:, :, where] = torch.where(full, sink_keys, self.keys[:, :, where])
            self.values[:, :, where] = torch.where(full, self.sink_values, self.values[:, :, where])

    def _sinks_rotated_from(self, row: int) -> torch.Tensor:
        """The sinks rotated to table rows ``row ..``: one batched rotation every ``SINKS_AHEAD`` placements."""
        if self.ahead is None or not 0 <= row - self.ahead_start < self.ahead.shape[0]:
            sinks = self.sink_keys.shape[-2]
            count = min(SINKS_AHEAD, self.table.cos.shape[0] - sinks - row + 1)
            rows = row + torch.arange(count, device=self.table.cos.device)[:, None] + torch.arange(
                sinks, device=self.table.cos.device)
            self.ahead = self.table.rotate(self.sink_keys[None], rows[:, None, None]).to(self.dtype)
            self.ahead_start = row
        return self.ahead[row - self.ahead_start]

    def _capture_sinks(self, capture: tuple[torch.Tensor, ...], key_states: torch.Tensor,
                       value_states: torch.Tensor) -> None:
        """Keep an unrotated float32 copy of each row's first tokens: every later sink write starts from it."""
        rows, ids, cols, positions = (t.to(self.device) for t in capture)
        self.sink_keys[rows, :, ids] = rotate(key_states[rows, :, cols], -positions[:, None], self.inv_freq)
        self.ahead = None
        self.sink_values[rows, :, ids] = value_states[rows, :, cols]

    def relocate(self, plan: StepPlan, old_base: int) -> None:
        """Compaction (and growth or shrinking): move the live slots to the start of a buffer of plan.capacity."""
        if plan.base == old_base and plan.capacity == self.keys.shape[-2]:
            return
        src = slice(plan.region_start - old_base, plan.start - old_base)
        live = plan.start - plan.region_start
        if plan.capacity == self.keys.shape[-2]:
            self.keys[:, :, :live] = self.keys[:, :, src].clone()
            self.values[:, :, :live] = self.values[:, :, src].clone()
            return
        keys = self.keys.new_zeros(*self.keys.shape[:2], plan.capacity, self.keys.shape[-1])
        values = self.values.new_zeros(*self.values.shape[:2], plan.capacity, self.values.shape[-1])
        keys[:, :, :live], values[:, :, :live] = self.keys[:, :, src], self.values[:, :, src]
        self.keys, self.values = keys, values

    def rebase(self, plan: StepPlan, shift: int) -> None:
        """Positions drop by ``shift``: rotate the live window keys back once (float32, one rounding)."""
        live = slice(plan.region_start - plan.base, plan.start - plan.base)
        back = torch.tensor(-shift, device=self.device)
        self.keys[:, :, live] = rotate(self.keys[:, :, live], back, self.inv_freq).to(self.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.parent.mask_sizes()

    def get_seq_length(self) -> int:
        return self.parent.seen

    def get_max_length(self) -> int:
        return -1  # the stream is unbounded; what is kept is bounded by window_length

    def reset(self) -> None:
        self.__init__(self.parent, self.layer_idx)  # type: ignore[misc]  # back to the lazy, empty state

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.device)
            self.keys, self.values = self.keys[index], self.values[index]
            self.sink_keys, self.sink_values = self.sink_keys[index], self.sink_values[index]
            self.ahead = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "SinkCache cannot be cropped: evicted tokens are gone, so it cannot roll back. Assisted/speculative "
            "decoding and other callers of crop() need a DynamicCache."
        )


NOT_ENABLED = (
    "SinkCache received keys from a forward pass it was not prepared for. Call sinkcache.enable_streaming(model) "
    "once before using a SinkCache: it assigns the positions inside the cache that the model needs."
)
INTERRUPTED = "A previous forward pass on this SinkCache did not finish; call cache.reset()."


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
        self.layers: list[SinkLayer]  # type: ignore[assignment]  # only SinkLayers, created by update()
        self.window_length = window_length
        self.num_sink_tokens = num_sink_tokens
        self.static_shapes = static_shapes
        self.slack = max(16, window_length // 4)  # compaction every `slack` tokens copies the window once
        self.rope: RopeSpec | None = None
        self._tables: dict[tuple[int, torch.device, int], RotationTable] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the cache can then serve a new one (any batch size) on the same model."""
        self.layers = []
        self.seen = 0  # columns fed so far, padding included (what generate() calls the sequence length)
        self.base = 0
        self.offset = 0
        self.plan: StepPlan | None = None
        self.first_real: torch.Tensor | None = None  # [batch] absolute slot of each row's first real token
        self._first_min = self._first_max = _NO_TOKEN  # its extremes, as ints for the per-step fast path
        self._all_real = True

    def __repr__(self) -> str:
        return (f"SinkCache(window_length={self.window_length}, num_sink_tokens={self.num_sink_tokens}, "
                f"static_shapes={self.static_shapes}, seen={self.seen}, layers={len(self.layers)})")

    # ---- the policy: one step ------------------------------------------------------------------------------
    def begin_step(self, new_mask: torch.Tensor, rope: RopeSpec, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plan the next forward call, compact or re-base the stored layers, and return the model's inputs.

        Args:
            new_mask: ``[batch, num_new]`` bool, which new columns are real tokens (False = padding).
            rope: the model's rotary spec; a cache serves one model only.
            device: where the model's inputs live; the plan's index tensors (static shapes) are made there.

        Returns:
            ``position_ids`` ``[batch, num_new]`` (CPU, long) and a 2D validity mask over the buffer from index 0 to
            the last attended one (CPU, bool), or ``None`` when every attended slot is valid.
        """
        if self.rope is not None and self.rope.model_id != rope.model_id:
            raise ValueError("This SinkCache was used with another model; create one SinkCache per model.")
        if any(layer.pending for layer in self.layers):
            raise RuntimeError(INTERRUPTED)
        self.rope = rope
        new_mask = new_mask.to("cpu", torch.bool)
        batch, n = new_mask.shape
        if n == 0:
            raise ValueError("SinkCache: a forward call must contain at least one token.")
        self._track_rows(new_mask)
        assert self.first_real is not None
        t, window, sinks = self.seen, self.window_length, self.num_sink_tokens
        region_start = max(0, t - window)  # the sinks of full rows go here; the window is [region_start+sinks, t)

        # Compaction when the new tokens do not fit; growth for a chunk larger than the slack, shrink after it.
        old_base, capacity = self.base, self.layers[0].keys.shape[-2] if self.layers else window + self.slack
        base, default = old_base, window + self.slack
        if t + n - base > capacity or (capacity > default and t + n - region_start <= default):
            base, capacity = region_start, max(default, t + n - region_start)
        # Re-base positions when the next query would pass the limit (float32 precision, length-dependent RoPE).
        # Re-bases are then more than `window` slots apart, longer than any window key lives: one re-rotation each.
        limit = 2 * window + n
        if rope.max_position is not None:
            if window + n > rope.max_position:
                raise ValueError(
                    f"window_length ({window}) + tokens per call ({n}) exceed {rope.max_position}, the longest "
                    "context at which this model's length-dependent RoPE keeps fixed frequencies. Use a smaller "
                    "window_length or feed fewer tokens per call."
                )
            limit = min(limit, rope.max_position)
        shift = 0
        if t + n - self.offset > limit:
            shift, self.offset = region_start - self.offset, region_start

        # Rows are "full" once their stream outgrew the window: their sinks move to region_start every step.
        some_full, all_full = sinks > 0 and self._first_min < region_start, self._first_max < region_start
        full_rows = self.first_real < region_start if some_full and not all_full else None
        capture: tuple[torch.Tensor, ...] | None = None
        if t < self._first_max + sinks:  # some row's first tokens arrive now: keep them as its sinks
            sink_slot = self.first_real[:, None] + torch.arange(sinks)[None, :]
            rows, ids = ((sink_slot >= t) & (sink_slot < t + n)).nonzero(as_tuple=True)
            if len(rows):
                slots = sink_slot[rows, ids]
                capture = (rows, ids, slots - t, slots - self.offset)
        lo, now = region_start - base, t - base
        sink_position = region_start - self.offset  # in the rotation table: <= window_length (see rotation_table)
        write_at: slice | torch.Tensor
        sinks_at: slice | torch.Tensor
        sink_rows: slice | torch.Tensor
        query_offset: int | torch.Tensor
        if self.static_shapes:
            write_at = torch.arange(now, now + n, device=device)
            sinks_at = torch.arange(lo, lo + sinks, device=device)
            sink_rows = torch.arange(sink_position, sink_position + sinks, device=device)
            attend, query_offset = slice(None), torch.tensor(now + 1, device=device)  # + 1: see mask_sizes
        else:
            write_at, sinks_at = slice(now, now + n), slice(lo, lo + sinks)
            sink_rows, attend, query_offset = slice(sink_position, sink_position + sinks), slice(lo, now + n), now
        self.plan = StepPlan(
            start=t, num_new=n, region_start=region_start, base=base, capacity=capacity,
            write_at=write_at, sinks_at=sinks_at, sink_rows=sink_rows, attend=attend,
            some_full=some_full, all_full=all_full, full_rows=full_rows,
            new_mask=None if self._all_real else new_mask, capture=capture, query_offset=query_offset,
        )
        for layer in self.layers:
            layer.relocate(self.plan, old_base)
            if shift:
                layer.rebase(self.plan, shift)
            layer.pending = True
        self.base, self.seen = base, t + n

        position_ids = torch.arange(t - self.offset, t + n - self.offset).view(1, n)
        if batch > 1:
            position_ids = position_ids.expand(batch, n).clone()
        if self.static_shapes:  # the whole buffer is attended: hide what lies outside the live region
            slots = torch.arange(base - 1, base + capacity)[None, :]  # from -1: see mask_sizes
            return position_ids, (slots >= self.first_real[:, None].clamp(min=region_start)) & (slots < t + n)
        if self._first_max <= region_start:  # every attended slot holds a real token
            return position_ids, None
        return position_ids, torch.arange(base, t + n)[None, :] >= self.first_real[:, None]

    def _track_rows(self, new_mask: torch.Tensor) -> None:
        """Record where each row's real tokens start (left padding); refuse padding after a real token."""
        batch, n = new_mask.shape
        if self.first_real is not None and self.first_real.shape[0] != batch:
            raise ValueError(
                f"This SinkCache holds a stream of batch size {self.first_real.shape[0]}, but got batch size {batch}. "
                "Call cache.reset() or create a new SinkCache for a new batch."
            )
        self._all_real = bool(new_mask.all())
        if self.first_real is not None and self._all_real and self._first_max < _NO_TOKEN:
            return  # steady state: every row started, no padding
        t = self.seen
        first_real = self.first_real if self.first_real is not None else torch.full((batch,), _NO_TOKEN)
        first_new = torch.where(new_mask.any(1), new_mask.long().argmax(1), n)  # argmax: first True
        first_real = torch.where(first_real < _NO_TOKEN, first_real,
                                 torch.where(first_new < n, t + first_new, _NO_TOKEN))
        if bool(((torch.arange(t, t + n)[None, :] >= first_real[:, None]) & ~new_mask).any()):
            raise ValueError(
                "SinkCache supports left padding only: a row has padding after its first real token. Pad each "
                "sequence on the left of its first call, or stream the rows separately."
            )
        self._set_first_real(first_real)

    def _set_first_real(self, first_real: torch.Tensor) -> None:
        """Store each row's first real slot, with its extremes as ints for the per-step fast path."""
        self.first_real = first_real
        self._first_min, self._first_max = int(first_real.min()), int(first_real.max())

    def rotation_table(self, inv_freq: torch.Tensor, head_dim: int) -> RotationTable:
        """The table of sink rotations for one frequency set, built on first use.

        Sinks sit at positions ``region_start - offset + j``; the re-base keeps ``region_start - offset`` at most
        ``window_length``, so ``window_length + num_sink_tokens`` rows cover every step.
        """
        key = (id(inv_freq), inv_freq.device, head_dim)
        if key not in self._tables:
            self._tables[key] = RotationTable(inv_freq, head_dim, self.window_length + self.num_sink_tokens)
        return self._tables[key]

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
            self.layers.append(SinkLayer(self, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far (padding columns included); the cache itself holds at most ``window_length``."""
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self.plan is None:  # before any step (e.g. generate probing a fresh cache)
            return query_length, 0
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

    def cached_length(self) -> int:
        """Tokens held after the last step's eviction, i.e. what the next token will attend to (<= window)."""
        return min(self.seen, self.window_length)

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.first_real is not None:
            self._set_first_real(self.first_real[index.cpu()])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)
        super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.first_real is not None:
            self._set_first_real(self.first_real.repeat_interleave(repeats))
        super().batch_repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        SinkLayer.crop(self, tokens_to_remove)  # type: ignore[arg-type]  # the same refusal

    @property
    def is_compileable(self) -> bool:
        # Even with static shapes: for a "compileable" cache, generate() builds the 4D mask itself before the forward
        # (from the previous step's sizes), which would bypass the slot mask. Compile the model or its decoder instead.
        return False
