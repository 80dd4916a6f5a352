"""What a ``SinkCache`` holds for its stream between steps: its settings and state, the layers (which kind each
decoder layer gets, their groups, the sinks' rotation tables), the batch's rows, and the bytes all of it takes.

``StreamStorage`` is the base of ``SinkCache``; the step that moves all of this on is ``StreamStep`` (``step.py``),
and what transformers calls is ``SinkCache`` (``sink_cache.py``). The storage survives leaving
``torch.inference_mode()`` and pickling by re-making the views it relies on (``_rebuild``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache

from ..ledger import TokenLedger
from ..policy import Policy
from ..rotary import RopeSpec, RotationTable
from .errors import NotEnabledError
from .group import LayerGroup
from .layers import SinkLayer, SlidingLayer, StaticSinkLayer
from .plan import StepPlan, position_limit
from .rows import NO_TOKEN
from .tensors import SlotMask, StepNumbers

TABLE_STEPS = 16  # the sinks' rotation table serves this many steps, then is rewritten (four small kernels)


class StreamStorage(Cache):
    """The settings, state and storage of a ``SinkCache`` (see ``SinkCache`` for the arguments, which it checks).

    The state that ``reset`` sets is the stream's; the rest is the cache's, kept across resets: its settings, the
    model's rotary spec and the layout it implies, and the rotation tables.
    """

    def __init__(self, window_length: int, num_sink_tokens: int, static_shapes: bool):
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
        self._limit = 0  # positions of one-token calls stay below this (position_limit; set with the rope)
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
        self._first_min = self._first_max = NO_TOKEN  # its extremes, as ints for the per-step fast path
        self._rows = -1  # its length: the stream's batch size
        # the one-token calls' position ids and write indices, refilled in place, and the slot mask (_new_step_tensors)
        self._new_step_tensors()
        self.groups: list[LayerGroup] = []  # formed at the second step, when every layer has its storage
        self._grouped = False
        self.ledger = TokenLedger()  # what the stream consumed, for generate()'s prefix check (sinkcache.ledger)

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
        self._limit = position_limit(self.window_length, rope.max_position, 1)  # for _steady

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

    @property
    def sliding_layers(self) -> list[SlidingLayer]:
        return [layer for layer in self.layers if isinstance(layer, SlidingLayer)]

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

    def _new_step_tensors(self) -> None:
        """Fresh tensors of the one-token steps' position ids, write indices and (static shapes) query offset (see
        ``StepNumbers``), and a fresh slot mask of static shapes."""
        self._numbers = StepNumbers()
        self._slot_mask = SlotMask()

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

    def _set_first_real(self, first_real: torch.Tensor) -> None:
        """Store each row's first real slot, with its extremes as ints for the per-step fast path."""
        self.first_real, self._rows = first_real, first_real.shape[0]
        self._first_min, self._first_max = int(first_real.min()), int(first_real.max())

    def _select_rows(self, index: torch.Tensor) -> None:
        self.ledger.select_rows(index)
        if self.first_real is not None:
            self._set_first_real(self.first_real[index.cpu()])
        for group in self._group_layers():
            group.select_rows(index)
        for layer in self.sliding_layers:
            layer.select_rows(index)

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
