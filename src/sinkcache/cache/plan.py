"""The step plan: what one forward call decides about the buffer and the positions, before any tensor moves.

``SinkCache.begin_step`` (``step.py``) takes from the policy (``policy.Policy``) which stream slots the call attends
to, decides with the functions of this module where they sit and at which positions, and records it in a
``StepPlan``, which the grouped storage (``group.py``) and every layer's ``update`` (``layers.py``) then apply.

* Slots number every column ever fed, padding included. A full-attention layer's buffer holds slot ``s`` at index
  ``s - base`` and writes tokens in stream order (until the cache rolls in place, ``step.py``), so the tokens a step
  attends to are one contiguous slice of it: a view, never a copy, and the standard causal / sliding-window masks of
  transformers apply unchanged (slot distance == in-cache distance).
* Positions are ``slot - offset``: window keys keep the rotation they were given when they arrived, and the query
  gets the next position, so their distances are right without touching them. The sinks are the only tokens that
  move: each step they are written just before the oldest window token, at the positions before it (``group.py``).
* When the new tokens do not fit, the live slice is copied back to the start of the buffer (compaction,
  ``buffer_layout``).
* More than ``window_length`` tokens apart, the offset is re-based so that positions stay below ``2 *
  window_length`` plus the call's tokens (``position_limit``): a window key (of either layer kind) is re-rotated
  (float32, one rounding) at most once in its life. Per one-token step the work is O(sinks + 1) per layer.
* A row's first ``num_sink_tokens`` real tokens are its sinks: the step that brings them keeps a copy
  (``sink_capture``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def buffer_layout(seen: int, num_new: int, region_start: int, base: int, capacity: int,
                  default: int) -> tuple[int, int]:
    """The buffer's ``(base, capacity)`` for a call of ``num_new`` tokens after ``seen`` slots, given the current
    ones and the ``default`` capacity (the window plus the spare slots).

    Unchanged while the new tokens fit. Else compaction: the live region (from ``region_start``) moves to buffer
    index 0. A chunk larger than the spare slots grows the buffer to the region plus itself, and the next call that
    fits the default size shrinks it back.
    """
    if seen + num_new - base > capacity or (capacity > default and seen + num_new - region_start <= default):
        return region_start, max(default, seen + num_new - region_start)
    return base, capacity


def position_limit(window_length: int, max_position: int | None, num_new: int) -> int:
    """Positions of a call of ``num_new`` tokens stay below this (a re-base happens before they would not): twice
    the window plus the call, and never past ``max_position``, the longest context of a length-dependent RoPE."""
    if max_position is None:
        return 2 * window_length + num_new
    if window_length + num_new > max_position:
        raise ValueError(
            f"window_length ({window_length}) + tokens per call ({num_new}) exceed {max_position}, the longest "
            "context at which this model's length-dependent RoPE keeps fixed frequencies. Use a smaller "
            "window_length or feed fewer tokens per call."
        )
    return min(2 * window_length + num_new, max_position)


def sink_capture(first_real: torch.Tensor, seen: int, num_new: int, num_sink_tokens: int,
                 offset: int) -> tuple[torch.Tensor, ...] | None:
    """The new tokens that are sinks, for ``StepPlan.capture``: their row, sink index, column in the call and
    position (CPU long tensors), or ``None`` when there are none. ``first_real``: each row's first real slot."""
    sink_slot = first_real[:, None] + torch.arange(num_sink_tokens)[None, :]  # policy.sink_slots, row by row
    rows, ids = ((sink_slot >= seen) & (sink_slot < seen + num_new)).nonzero(as_tuple=True)
    if not len(rows):
        return None
    slots = sink_slot[rows, ids]
    return rows, ids, slots - seen, slots - offset
