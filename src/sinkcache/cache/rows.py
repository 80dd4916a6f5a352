"""The batch's rows: where each row's real tokens start, for left-padded batches.

Batches may be left-padded: padding slots are masked and zeroed, never become sinks, and each row's sinks are its own
first real tokens. Padding after a row's first real token is refused. The cache keeps each row's first real slot
(``SinkCache.first_real``, ``[batch]`` long, on the CPU) and its extremes as ints, which the per-step fast path reads.
"""

from __future__ import annotations

import torch

NO_TOKEN = 2**62  # first_real value of a row that has only seen padding


def first_real_after(first_real: torch.Tensor | None, seen: int, valid: torch.Tensor) -> torch.Tensor:
    """Each row's first real slot after a call whose columns (slots ``seen ..``) are real where ``valid``
    (``[batch, n]`` bool, CPU); ``first_real`` is the one before the call (``None`` before the first call).

    Raises:
        ValueError: a row has padding after its first real token.
    """
    batch, n = valid.shape
    first_real = first_real if first_real is not None else torch.full((batch,), NO_TOKEN)
    first_new = torch.where(valid.any(1), valid.long().argmax(1), n)  # argmax: first True
    first_real = torch.where(first_real < NO_TOKEN, first_real,
                             torch.where(first_new < n, seen + first_new, NO_TOKEN))
    if bool(((torch.arange(seen, seen + n)[None, :] >= first_real[:, None]) & ~valid).any()):
        raise ValueError(
            "SinkCache supports left padding only: a row has padding after its first real token. Pad each "
            "sequence on the left of its first call, or stream the rows separately."
        )
    return first_real
