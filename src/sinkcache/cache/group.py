"""The grouped storage: the full-attention layers' buffers held together, and the work of a step on all of them at
once (moving the sinks, compaction, the position re-base, the ring, the views each layer attends to).

After the first step, ``SinkLayer`` s with the same storage shapes form a ``LayerGroup`` whose buffers are one
tensor: ``begin_step`` then rotates every layer's sinks with three kernels and makes every layer's views with two
operations, where one per layer would cost a call each.

The sinks are the only tokens that move: each step they are written into the ``num_sink_tokens`` slots just before
the oldest window token, rotated in float32 from a stored float32 copy of their keys at positions
``0 .. num_sink_tokens - 1`` (so that one rotation moves them all; one rounding, however long the stream). Rolling in
place (``step.py``), the sinks' slots stay, and a step rotates their keys' rotary dimensions only, which the group's
first layer runs when it receives the step's keys (``LayerGroup.roll``).

What the group does is decided elsewhere: where the region sits and when it re-bases by the step's plan
(``plan.py``), whether it rolls in place by ``SinkCache.begin_step``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..rotary import halves, rotate

if TYPE_CHECKING:  # annotations only: a group is made of layers, which point to it
    from .layers import SinkLayer


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
