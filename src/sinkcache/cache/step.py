"""One step of the stream, top to bottom: ``begin_step`` turns the policy into the step's plan, applies it to the
grouped storage, and returns the model's inputs; the layers' ``update`` then stores the step's keys.

``enable_streaming``'s hook (``patch.py``) calls ``begin_step`` before every forward call of the model. In order:

1. ``_admit``: the call can be served (the same model, no interrupted step, left padding only).
2. ``_follow_ring``: rolling in place (below), the region keeps its slots; a chunk first puts it back in order.
3. ``_plan``: the ``StepPlan`` (``plan.py``): where the buffer's slots are, the positions, the sinks to capture,
   whether to start rolling in place, and the addressing (``tensors.py``).
4. ``_store``: every ``LayerGroup`` (``group.py``) moves its slots as planned, rotates the sinks into place and
   gives its layers their views.
5. ``_inputs``: the position ids and the mask over the buffer, which the model's forward takes.

Then each layer's ``update`` (``layers.py``) writes the new keys and values and returns what the step attends to,
and the attention mask is sized by ``SinkCache.mask_sizes``.

Rolling in place
----------------
Once every row's stream is longer than the window, one-token calls stop moving the region: it keeps its
``window_length + 1`` slots, the sinks its first ones, and each new token overwrites the slot of the token evicted
after the previous call (a ring). The attended tokens are then no longer in stream order, which attention without a
mask cannot tell: each key carries its position in its rotation, and the sum over keys does not depend on their
order. The layers' views and the sinks' slots are then the same at every step, so a step creates no views and
writes the sinks' keys only; this decode steady state has a short path of its own (``_roll_one``), whose sink
rotation the group's first layer runs when it receives the step's keys (``LayerGroup.roll``). A chunk (``n > 1``)
first rolls the ring back into stream order (its causal mask counts slot distances), and a model with a
``SinkLayer`` whose sliding or chunked attention window is shorter than ``window_length + 1`` never rolls in place,
for the same reason; its buffer then keeps ``slack`` spare slots, so that compaction happens once every ``slack``
tokens. Neither do static shapes: their mask follows stream order. A ``SlidingLayer`` rolls by itself in a ring of
``w`` slots (see its docstring).
"""

from __future__ import annotations

import torch

from ..rotary import RopeSpec
from .errors import INTERRUPTED
from .plan import StepPlan, buffer_layout, position_limit, sink_capture
from .rows import NO_TOKEN, first_real_after
from .storage import StreamStorage
from .tensors import CPU


class StreamStep(StreamStorage):
    """The step of a ``SinkCache``: ``begin_step``, and its short path for the decode steady state."""

    def begin_step(self, batch: int, num_new: int, new_mask: torch.Tensor | None, rope: RopeSpec,
                   device: torch.device = CPU) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        new_mask = self._admit(batch, num_new, new_mask, rope)
        self._group_layers()  # once, after the first step has given every layer its storage
        region_start = self.policy.region_start(self.seen)  # full rows: sinks here, window [region_start + sinks, seen)
        self._follow_ring(region_start, num_new)
        plan, position_ids, moved, shift = self._plan(region_start, num_new, new_mask, rope, device)
        self.plan = plan
        self._store(plan, moved, shift)
        self._planned()
        self.base, self.seen, self.stepping = plan.base, plan.start + num_new, True
        return self._inputs(plan, position_ids, batch, device)

    def _admit(self, batch: int, n: int, new_mask: torch.Tensor | None, rope: RopeSpec) -> torch.Tensor | None:
        """Check that this cache can serve the call, and take what the call brings: the model's rotary spec (on the
        first call), entering or leaving ``torch.inference_mode()``, where each row's real tokens start. Returns the
        new columns' validity as ``_track_rows`` does."""
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
        if n < 1:
            raise ValueError("SinkCache: a forward call must contain at least one token.")
        return self._track_rows(batch, n, new_mask)

    def _track_rows(self, batch: int, n: int, new_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Record where each row's real tokens start (left padding, ``rows.py``); refuse padding after a real token.

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
        if new_mask is None and self._first_max < NO_TOKEN:
            return None  # steady state: every row started, no padding
        valid = torch.ones(batch, n, dtype=torch.bool) if new_mask is None else new_mask
        self._set_first_real(first_real_after(self.first_real, self.seen, valid))
        return new_mask

    def _follow_ring(self, region_start: int, n: int) -> None:
        """Rolling in place, the region keeps its buffer slots: the stream slot of buffer index 0 moves on. A chunk
        needs stream order (the causal mask within it): it unrolls the ring first, and the cache stops rolling."""
        if self.ring is None:
            return
        at, origin = self.ring
        self.base = region_start - at
        if n > 1:
            sinks = self.num_sink_tokens
            ring_size = self.window_length + 1 - sinks  # the slots of the window and the new token
            for group in self.groups:
                group.unroll(at + sinks, ring_size, (region_start + sinks - origin) % ring_size)
            self.ring = None

    def _plan(self, region_start: int, n: int, new_mask: torch.Tensor | None, rope: RopeSpec,
              device: torch.device) -> tuple[StepPlan, torch.Tensor, slice | None, int]:
        """Decide the step (``plan.py``): where the buffer's slots are, the re-base, the sinks to capture, whether the
        region starts rolling in place, and the addressing. Returns the plan, the new tokens' position ids
        ``[1, n]``, the slots that compaction moves to the buffer's start (``None``: none) and the re-base's shift
        of positions (0: none)."""
        assert self.first_real is not None
        t, sinks, default = self.seen, self.num_sink_tokens, self.window_length + self.spare
        old_base, old_capacity = self.base, self.groups[0].units[0].shape[-2] if self.groups else default
        base, capacity = buffer_layout(t, n, region_start, old_base, old_capacity, default)
        moved = None if (base, capacity) == (old_base, old_capacity) else slice(region_start - old_base, t - old_base)
        # Re-base positions when the next query would pass the limit (float32 precision, length-dependent RoPE).
        # Re-bases are then more than `window` slots apart, longer than any window key lives: one re-rotation each.
        shift = 0
        if t + n - self.offset > position_limit(self.window_length, rope.max_position, n):
            shift, self.offset = region_start - self.offset, region_start
        # some row's first tokens arrive now: keep them as its sinks
        capture = sink_capture(self.first_real, t, n, sinks, self.offset) if t < self._first_max + sinks else None
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
        plan = StepPlan(
            start=t, num_new=n, region_start=region_start, base=base, capacity=capacity, write_at=write_at,
            attend=attend, new_mask=new_mask, capture=capture, query_offset=query_offset, real_from=self._first_max,
        )
        return plan, position_ids, moved, shift

    def _store(self, plan: StepPlan, moved: slice | None, shift: int) -> None:
        """Apply the plan to the storage, one ``LayerGroup`` at a time: compaction, the re-base, the sinks of the full
        rows rotated to the region's start, the layers' views; then the sliding layers' re-base."""
        assert self.first_real is not None
        t, n, region_start = plan.start, plan.num_new, plan.region_start
        lo, now = region_start - plan.base, t - plan.base
        # Rows are "full" once their stream outgrew the window: their sinks move to region_start every step, at
        # positions region_start - offset + j (<= window_length + j: see rotation_table).
        some_full = self.num_sink_tokens > 0 and self.policy.is_full(t, self._first_min)
        full_rows = self.first_real < region_start if some_full and self._first_max >= region_start else None
        for group in self.groups:
            if moved is not None:
                group.relocate(moved, plan.capacity)
            if shift:  # up to the new tokens' slots: rolling in place, the last one may hold a window token
                group.rebase(slice(lo, now + n), shift)
            if some_full:
                group.write_sinks(lo, region_start - self.offset, full_rows)
            if not self.static_shapes:  # with static shapes a layer attends to its whole unit
                group.attend(lo, now + n - lo)
        for layer in self.sliding_layers if shift else ():
            layer.rebase(shift)

    def _inputs(self, plan: StepPlan, position_ids: torch.Tensor, batch: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's inputs for the planned step: its position ids, one row per batch row, and the mask over the
        buffer (see ``begin_step``)."""
        assert self.first_real is not None
        stop = plan.start + plan.num_new
        if batch > 1:
            position_ids = position_ids.expand(batch, plan.num_new).clone()
        uniform = self._first_max <= plan.region_start  # every row holds real tokens from the region's start on
        if self.static_shapes:  # the whole buffer is attended: hide what lies outside the live region
            return position_ids, self._slot_mask.update(self.first_real, plan.region_start, stop, plan.base,
                                                        plan.capacity, uniform, device)
        if uniform:  # every attended slot holds a real token
            return position_ids, None
        return position_ids, torch.arange(plan.base, stop)[None, :] >= self.first_real[:, None]

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
