"""Where a decode step's time goes: SinkCache's fixed per-step cost against DynamicCache's, on the tiny model.

Run from the repository root::

    python benchmarks/step_cost.py                 # W = 256, 1024 and 4096; about 90 s on 2 CPU cores

For each cache size ``W`` the tiny model (``benchmarks/speed.py``'s) decodes one token at a time with a SinkCache
past its window and with a DynamicCache holding ``W`` tokens (cropped back after each step), the two alternating
step by step. Three parts are timed with ``time.perf_counter`` wrappers (each adds well under a microsecond):

* the whole forward call;
* SinkCache's planning hook (``sinkcache.patch._positions_for_step``: the mask check, ``begin_step``, the positions
  and write index; past the window the cache rolls in place, so the layers' views stay the same);
* the cache's per-layer ``update`` (``SinkLayer.update`` / ``DynamicLayer.update``), summed over the layers; for
  SinkCache it includes the rotation of the sinks, which the group's first layer runs (``LayerGroup.roll``).

Medians per step are printed; the rest of the difference (attention over a view, mask creation) is what is left.
This explains the throughput ratios of ``benchmarks/speed.py`` on the tiny model; it is a profile, not a target.

A second table bounds what removing parts of the step could gain: the same steps, alternating among DynamicCache,
SinkCache and two reduced SinkCache steps:

* *without the sinks' rotation*: the real step, except that the sinks are never moved (the three kernels of
  ``RotationTable.rotate_into``, run once per step for every layer of the group, are skipped): what the rotation
  costs in place;
* *kernels only*: the hook only hands out the position ids, which it never moves on, where the real step moves them
  with one ``add_`` every few steps; the first layer's update rotates the sinks through a rotation table it never
  rewrites, where the real step rewrites it every 16 steps with four small kernels; each layer's update writes its
  new token, always into the same slot: what the planning's and the updates' Python costs in place.

The reduced steps keep no valid cache (their outputs are not used): they are timing bounds, not something a cache
could ship.

A third table shows what the step before costs. ``benchmarks/speed.py`` interleaves the two caches token by token
(so that a slow spell of the machine hits both), which puts every step of one cache right after a step of the other,
where real decoding runs one cache's steps back to back. Here two DynamicCaches and two SinkCaches run every step in
a fixed order (DynamicCache, DynamicCache, SinkCache, SinkCache), so that of each kind one cache always follows a step
of the other kind and one a step of its own kind; the two caches of a kind swap places halfway, so that each cache
(and its memory placement) is measured in both. The table gives the median step in each place.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import sinkcache.patch
from sinkcache import CACHE_KWARG, SinkCache, enable_streaming
from sinkcache.cache import LayerGroup, SinkLayer
from sinkcache.patch import _PositionHook

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import SINKS, tiny_model  # noqa: E402 - the speed benchmark's model, from the folder of this script


class Timer:
    """Accumulates the seconds spent in wrapped functions, per label, for the current step."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - start

        return timed


def streams(window: int, sinks: int, dynamics: int) -> tuple[Any, torch.Tensor, list[SinkCache], list[DynamicCache]]:
    """The tiny model streaming with cache size ``window``, its token ids (``window + 64``), ``sinks`` SinkCaches
    rolling in place past their window and ``dynamics`` DynamicCaches holding ``window`` tokens."""
    model = enable_streaming(tiny_model(torch.device("cpu")), window, SINKS)
    ids = torch.randint(3, model.config.vocab_size, (1, window + 64), generator=torch.Generator().manual_seed(0))
    sink_caches, dynamic_caches = [SinkCache(window, SINKS) for _ in range(sinks)], [DynamicCache()
                                                                                   for _ in range(dynamics)]
    for cache in sink_caches:
        model(input_ids=ids[:, :window], **{CACHE_KWARG: cache})
        model(input_ids=ids[:, 64:], **{CACHE_KWARG: cache})  # past the window: every step evicts
        model(input_ids=ids[:, :1], **{CACHE_KWARG: cache})  # one token: rolling in place from here on
    for dynamic in dynamic_caches:
        model(input_ids=ids[:, -window:], **{CACHE_KWARG: dynamic})
    return model, ids, sink_caches, dynamic_caches


@torch.no_grad()
def profile(window: int, steps: int) -> dict[str, float]:
    """Median microseconds per step of each timed part, for both caches."""
    timer = Timer()
    model, ids, [sink], [dynamic] = streams(window, 1, 1)
    originals = (sinkcache.patch._positions_for_step, SinkLayer.update, DynamicLayer.update)
    sinkcache.patch._positions_for_step = timer.wrap("plan", originals[0])
    SinkLayer.update = timer.wrap("update", originals[1])  # type: ignore[method-assign]
    DynamicLayer.update = timer.wrap("update", originals[2])  # type: ignore[method-assign]
    samples: dict[str, list[float]] = {}
    try:
        for step in range(steps):
            token = ids[:, step % ids.shape[1]][:, None]
            pair = (("sink", sink), ("dynamic", dynamic))
            for name, cache in pair if step % 2 == 0 else pair[::-1]:
                timer.spent = {}
                start = time.perf_counter()
                model(input_ids=token, **{CACHE_KWARG: cache})
                samples.setdefault(f"{name} step", []).append(time.perf_counter() - start)
                for label, seconds in timer.spent.items():
                    samples.setdefault(f"{name} {label}", []).append(seconds)
                if cache is dynamic:
                    dynamic.crop(-1)
    finally:
        sinkcache.patch._positions_for_step, SinkLayer.update, DynamicLayer.update = originals  # type: ignore[method-assign]
    return {label: statistics.median(values) * 1e6 for label, values in samples.items()}


@torch.no_grad()
def bounds(window: int, steps: int) -> dict[str, float]:
    """Median microseconds per step of DynamicCache, SinkCache and SinkCache's two reduced steps (module docstring)."""
    model, ids, [sink, unrotated, reduced], [dynamic] = streams(window, 3, 1)
    caches: dict[str, SinkCache | DynamicCache] = {"sink": sink, "without rotation": unrotated,
                                                   "kernels only": reduced, "dynamic": dynamic}
    assert reduced.ring is not None and len(reduced.groups) == 1, "the tiny model rolls in place in one group"
    group = reduced.groups[0]
    [(sink_keys, folded, sink_slots)] = group.rolling
    cos, sin = group.table.row(group.table.first)
    position_ids, index = reduced._numbers.views[0]
    index = index.clone()  # a fixed slot: the stored keys are not a cache's any more
    first_layer = group.layers[0]

    def hook(self: _PositionHook, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        if kwargs.get(CACHE_KWARG) is not reduced:
            return original_hook(self, module, args, kwargs)
        kwargs["position_ids"] = position_ids
        return args, kwargs

    def update(self: SinkLayer, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.parent is not reduced:
            return original_update(self, key_states, value_states, *args, **kwargs)
        if self is first_layer:
            torch.add(sink_keys * cos, folded * sin, out=sink_slots)
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        return self.attending

    def rotate_pending(self: LayerGroup) -> None:
        if self.layers[0].parent is unrotated:
            self.pending = None
        else:
            original_rotate(self)

    original_hook, original_update = _PositionHook.__call__, SinkLayer.update
    original_rotate = LayerGroup.rotate_pending
    _PositionHook.__call__, SinkLayer.update = hook, update  # type: ignore[method-assign]
    LayerGroup.rotate_pending = rotate_pending  # type: ignore[method-assign]
    samples: dict[str, list[float]] = {name: [] for name in caches}
    order = list(caches.items())
    try:
        for step in range(steps):
            token = ids[:, step % ids.shape[1]][:, None]
            for name, cache in order[step % len(order) :] + order[: step % len(order)]:
                start = time.perf_counter()
                model(input_ids=token, **{CACHE_KWARG: cache})
                samples[name].append(time.perf_counter() - start)
                if isinstance(cache, DynamicCache):
                    cache.crop(-1)
    finally:
        _PositionHook.__call__, SinkLayer.update = original_hook, original_update  # type: ignore[method-assign]
        LayerGroup.rotate_pending = original_rotate  # type: ignore[method-assign]
    return {name: statistics.median(values) * 1e6 for name, values in samples.items()}


@torch.no_grad()
def after_which_step(window: int, steps: int) -> dict[str, float]:
    """Median microseconds of each cache's step after a step of the other kind and after one of its own kind (see the
    module docstring)."""
    model, ids, sinks, dynamics = streams(window, 2, 2)
    names = ("dynamic after sink", "dynamic after dynamic", "sink after dynamic", "sink after sink")
    samples: dict[str, list[float]] = {name: [] for name in names}
    for step in range(steps):
        token = ids[:, step % ids.shape[1]][:, None]
        swap = step >= steps // 2  # each cache, and its memory placement, in both places
        order = (*dynamics[:: -1 if swap else 1], *sinks[:: -1 if swap else 1])
        for name, cache in zip(names, order):
            start = time.perf_counter()
            model(input_ids=token, **{CACHE_KWARG: cache})
            samples[name].append(time.perf_counter() - start)
            if isinstance(cache, DynamicCache):
                cache.crop(-1)
    return {name: statistics.median(values) * 1e6 for name, values in samples.items()}


def split_cells(us: dict[str, float]) -> list[str]:
    difference = us["sink step"] - us["dynamic step"]
    rest = difference - us["sink plan"] - (us["sink update"] - us["dynamic update"])
    return [f"{us['sink step']:.0f} / {us['dynamic step']:.0f}", f"{difference:+.0f}", f"{us['sink plan']:.0f}",
            f"{us['sink update']:.0f} / {us['dynamic update']:.0f}", f"{rest:+.0f}"]


def bounds_cells(us: dict[str, float]) -> list[str]:
    dynamic, steps = us["dynamic"], (us["sink"], us["without rotation"], us["kernels only"])
    return [f"{dynamic:.0f} / " + " / ".join(f"{step:.0f}" for step in steps),
            " / ".join(f"{dynamic / step:.3f}" for step in steps)]


def after_cells(us: dict[str, float]) -> list[str]:
    crossed = us["dynamic after sink"], us["sink after dynamic"]
    own = us["dynamic after dynamic"], us["sink after sink"]
    return [f"{crossed[0]:.0f} / {crossed[1]:.0f}", f"{own[0]:.0f} / {own[1]:.0f}",
            f"{crossed[0] / crossed[1]:.3f} / {own[0] / own[1]:.3f}"]


#: each table: its columns after W, what it measures per cache size, and its cells from the measured medians
TABLES: list[tuple[list[str], Callable[[int, int], dict[str, float]], Callable[[dict[str, float]], list[str]]]] = [
    (["step µs SinkCache / DynamicCache", "difference", "planning hook",
      "cache updates SinkCache / DynamicCache (all layers)", "rest of the difference"], profile, split_cells),
    (["step µs DynamicCache / SinkCache / without the sinks' rotation / kernels only",
      "throughput vs DynamicCache: SinkCache / without the sinks' rotation / kernels only"], bounds, bounds_cells),
    (["step µs after the other kind: DynamicCache / SinkCache", "after its own kind: DynamicCache / SinkCache",
      "throughput vs DynamicCache: after the other kind / after its own kind"], after_which_step, after_cells),
]


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024, 4096], help="cache sizes W (tokens)")
    parser.add_argument("--steps", type=int, default=3000, help="decode steps per cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for columns, measure, cells in TABLES:
        print("| W | " + " | ".join(columns) + " |")
        print("|---:" * (len(columns) + 1) + "|")
        for window in args.sizes:
            print("| " + " | ".join([str(window), *cells(measure(window, args.steps))]) + " |", flush=True)
        print()


if __name__ == "__main__":
    main()
