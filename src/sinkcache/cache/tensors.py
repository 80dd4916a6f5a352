"""The step's numbers as tensors on the model's device, kept from step to step: the position ids, write indices and
query offset (``StepNumbers``) and, with static shapes, the slot mask (``SlotMask``).

A decode step of a small model is bound by per-call costs (a kernel or a view per step, measured: see
``benchmarks/step_cost.py``), so a one-token step's tensors are views made once and updated in place.

Static shapes (``static_shapes=True``, for ``torch.compile``)
-------------------------------------------------------------
The layout and the positions are the same; only the *addressing* changes. Each step then attends to the whole
buffer (``window_length + slack`` slots) and a ``[batch, slots]`` mask hides the slots outside the live region, the
new tokens are written through an index tensor, and the query offset of the causal mask is a tensor. A one-token
step therefore has the same shapes and the same Python control flow at every step: inside the model's forward the
cache reads no Python number that changes, so a compiled decode step compiles once. Everything that does depend on
the step's numbers (the plan, moving the sinks, compaction and the position re-base) runs in ``begin_step``, before
the model's forward, outside the graph. Each layer keeps a buffer of its own here (see ``LayerGroup``), and every
layer, sliding or not, is a ``StaticSinkLayer``: one mask serves them all. The price is attention over the slack
slots too (masked): 1.25x the keys of the default addressing, and the memory of that layout on every layer.
"""

from __future__ import annotations

import torch

CPU = torch.device("cpu")
RUN_STEPS = 4  # one-token steps served by one fill of their numbers' tensor (StepNumbers)


class StepNumbers:
    """The numbers of a step that the model reads as tensors, on its device: the new tokens' position ids
    ``[1, n]``, their buffer indices ``[n]`` and, with static shapes, the causal mask's query offset ``[]``.

    For one token (every decode step) they are views of one small tensor kept from step to step, ``[numbers,
    RUN_STEPS]``: column ``i`` holds the numbers of the ``i``-th step of a run in which every number moves on by
    one, and its views are made once. Such a step only hands out the next column's views; the run after it is one
    ``add_``, and a step whose numbers jump (a ring's wrap, a re-base) refills the tensor with one ``arange`` per
    number. A returned tensor is valid until the tensor is refilled, at the latest ``RUN_STEPS`` calls later: each
    serves one forward call.
    """

    def __init__(self) -> None:
        self.kept: torch.Tensor | None = None  # [numbers, RUN_STEPS]: 2 numbers, or 3 with the query offset
        self.views: list[tuple[torch.Tensor, ...]] = []  # per column: the views the model takes
        self.run: list[tuple[int, ...]] = []  # per column: the numbers it holds
        self.column = RUN_STEPS  # the column handed out last
        self.device = CPU  # where kept lives

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
