"""SinkCache: the StreamingLLM cache (attention sinks + a rolling window) as a transformers 5 ``Cache``.

This is the class users make and transformers calls: its arguments, and the ``Cache`` interface, answered from the
step that ``begin_step`` planned (``step.py``). What it keeps between steps is ``StreamStorage`` (``storage.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import compat
from .layers import SlidingLayer, StreamLayer
from .step import StreamStep


def check_sizes(window_length: object, num_sink_tokens: object, static_shapes: object, caller: str) -> None:
    """Refuse sizes no cache can have, with messages that name ``caller`` (the function the user called)."""
    for name, value in (("window_length", window_length), ("num_sink_tokens", num_sink_tokens)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{caller} {name} must be an int, got {type(value).__name__} {value!r}.")
    assert isinstance(window_length, int) and isinstance(num_sink_tokens, int)
    if num_sink_tokens < 0:
        raise ValueError(f"{caller} num_sink_tokens must be >= 0, got {num_sink_tokens}.")
    if window_length <= num_sink_tokens:
        raise ValueError(
            f"{caller} window_length ({window_length}) must be larger than num_sink_tokens ({num_sink_tokens}): it "
            "counts the sinks plus at least one recent token, so it must be at least num_sink_tokens + 1. Increase "
            "window_length."
        )
    if not isinstance(static_shapes, bool):
        raise TypeError(f"{caller} static_shapes must be True or False, got {static_shapes!r}.")


class SinkCache(StreamStep):
    """A KV cache that keeps the first ``num_sink_tokens`` tokens forever plus a rolling window of recent tokens.

    Args:
        window_length: total number of cached tokens, sinks included (as in transformers' former SinkCache).
        num_sink_tokens: how many of the stream's first tokens are kept forever (the attention sinks).
        static_shapes: attend to the whole buffer through a mask, so that every one-token step has the same shapes
            and a ``torch.compile``d model (or decoder) compiles its decode step once. Same positions and outputs;
            about 1.25x the attention keys. ``generate`` does not compile by itself (``is_compileable`` is False).

    Use it through ``sinkcache.enable_streaming(model)``, which installs the hook that gives each forward call
    its positions and mask from ``begin_step``. The position contract is ``policy.Policy``'s; how the storage
    keeps it, the docstrings of ``sinkcache.cache``'s modules (in the order of a step: ``step.py``).
    """

    def __init__(self, window_length: int = 1024, num_sink_tokens: int = 4, *, static_shapes: bool = False):
        check_sizes(window_length, num_sink_tokens, static_shapes, "SinkCache")
        super().__init__(window_length, num_sink_tokens, static_shapes)

    def __repr__(self) -> str:
        return (f"SinkCache(window_length={self.window_length}, num_sink_tokens={self.num_sink_tokens}, "
                f"static_shapes={self.static_shapes}, seen={self.seen}, layers={len(self.layers)})")

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

    def cached_length(self) -> int:
        """Tokens held after the last step's eviction, i.e. what the next token will attend to (<= window)."""
        return min(self.seen, self.window_length)

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
