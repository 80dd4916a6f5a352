"""An independent oracle for the position contract: one cache-free forward with a custom mask and positions.

It shares no code with sinkcache. For every token it lists what the contract says the token sees
(``contract_visible``), then builds one sequence in which every query sees exactly that, at exactly the contract's
query-key distances (``oracle_logits``):

* window tokens keep their stream index as position, so their distance to any later query is the stream distance,
  which equals the in-cache distance (the window is contiguous);
* the sinks must sit just before the oldest window token, a distance that changes with every eviction. Each query
  that has evicted ``e`` tokens therefore gets its own copy of the sink tokens at positions ``e .. e+S-1``. A copy
  attends only within itself, so by RoPE's shift invariance its hidden states equal the original sinks'.

Sliding-window layers additionally drop keys whose in-cache distance is ``>= sliding_window``.
"""

from __future__ import annotations

import torch


def contract_visible(chunk_sizes: list[int], window: int, sinks: int) -> list[list[int]]:
    """For each token of a stream fed in ``chunk_sizes`` calls: the sorted stream indices it sees (itself last)."""
    visible, start = [], 0
    for n in chunk_sizes:
        if start <= window:
            cached = list(range(start))
        else:
            cached = list(range(sinks)) + list(range(start - (window - sinks), start))
        visible += [cached + list(range(start, start + i + 1)) for i in range(n)]
        start += n
    return visible


def _mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def oracle_logits(model, tokens: torch.Tensor, visible: list[list[int]], sinks: int) -> torch.Tensor:
    """Logits ``[len(tokens), vocab]`` of a cache-free forward in which token t sees exactly ``visible[t]``."""
    num = len(tokens)
    copies: dict[int, int] = {}  # evicted count -> index of its first copied sink token
    positions = list(range(num))
    sequence = list(tokens.tolist())
    for t, seen in enumerate(visible):
        evicted = t - (len(seen) - 1)
        if evicted > 0 and sinks and evicted not in copies:
            copies[evicted] = len(sequence)
            sequence += sequence[:sinks]
            positions += [evicted + j for j in range(sinks)]
    size = len(sequence)
    allowed = torch.zeros(size, size, dtype=torch.bool)
    distance = torch.zeros(size, size, dtype=torch.long)
    for t, seen in enumerate(visible):
        evicted = t - (len(seen) - 1)
        for rank, u in enumerate(seen):
            column = copies[evicted] + u if (evicted > 0 and u < sinks) else u
            allowed[t, column] = True
            distance[t, column] = len(seen) - 1 - rank
    for start in copies.values():
        for i in range(sinks):
            allowed[start + i, start : start + i + 1] = True
            distance[start + i, start : start + i + 1] = torch.arange(i, -1, -1)

    config = model.config
    dtype = next(model.parameters()).dtype
    full = _mask(allowed, dtype)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = _mask(allowed & (distance < window), dtype) if window else full
    if layer_types is not None and len(set(layer_types)) > 1 or "sliding_attention" in (layer_types or []):
        mask: torch.Tensor | dict = {"full_attention": full, "sliding_attention": sliding}
    elif window and getattr(config, "use_sliding_window", True):
        mask = sliding
    else:
        mask = full
    out = model(input_ids=torch.tensor([sequence]), position_ids=torch.tensor([positions]), attention_mask=mask,
                use_cache=False)
    return out.logits[0, :num]


@torch.no_grad()
def recompute_logits(model, tokens: torch.Tensor, visible: list[int]) -> torch.Tensor:
    """Plain check for 1-layer models: a fresh forward over the visible tokens at positions 0..L."""
    ids = tokens[visible][None]
    return model(input_ids=ids, position_ids=torch.arange(len(visible))[None], use_cache=False).logits[0, -1]
