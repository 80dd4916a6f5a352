"""Decode speed of SinkCache against DynamicCache and sliding-window re-computation; latency and memory over a stream.

Run from the repository root::

    python benchmarks/speed.py            # full run (tiny model + SmolLM2-135M), 12-15 min on 2 CPU cores
    python benchmarks/speed.py --quick    # tiny model, small sizes, short stream: a smoke test (~20 s)

What is compared, for each model and cache size ``W`` (tokens kept, sinks included):

* **SinkCache**: the stream has passed ``W`` tokens, so every step evicts one token and attends to ``W + 1`` keys
  (the ``W`` kept plus itself).
* **DynamicCache holding the same number of tokens**: ``W`` tokens are cached, each timed step decodes one token
  against them (``W + 1`` keys, as above) and the token is then cropped again (``crop(-1)``, a view, not timed), so
  every step sees exactly the cache size SinkCache sees, with DynamicCache's own storage (a ``torch.cat`` per step).
* **Re-computation**: the sliding-window baseline of the StreamingLLM paper, one fresh forward over the last ``W``
  tokens for every new token (``use_cache=False``, ``logits_to_keep=1``: only the last token's logits).

The steps of SinkCache and DynamicCache are interleaved token by token (alternating which goes first) and the
re-computation forward follows each block, so machine drift hits all three alike. Each run gives a mean and a
median per-token time per method; the report quotes medians over runs, and ratios computed within each run
(pairs measured side by side), then their median. Throughput is tokens per second from the mean step time, so
SinkCache's periodic compaction and position re-base are included when they fall in the block; the same ratio is
also given from median step times, which a few steps slowed by other processes on a shared machine do not move.

The stream measurement (tiny model) feeds one token at a time for ``--stream-tokens`` tokens and records every
step's latency, the bytes held by the cache and the process' resident memory. At the end, the per-token latency
after the whole stream is measured interleaved with a copy of the same cache taken after ``--stream-early``
tokens, again in ``--runs`` runs. A DynamicCache stream of ``--dynamic-stream-tokens`` tokens shows the contrast.

The torch.compile study (tiny model and SmolLM2, ``W = --headline-window``) times, interleaved token by token,
a DynamicCache holding ``W`` tokens (reference), the default SinkCache, and ``SinkCache(static_shapes=True)`` eager
and compiled with inductor two ways (the decoder's forward; the whole model), and counts the graphs compiled after
the warm-up (recompilations).

Token ids are random: decode time does not depend on the values (no data-dependent control flow).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sinkcache import CACHE_KWARG, SinkCache, enable_streaming, machine

REPO = Path(__file__).resolve().parents[1]
SINKS = 4


# ---- machine and memory ------------------------------------------------------------------------------------------
def process_memory() -> tuple[int | None, int | None]:
    """``(resident, peak resident)`` bytes of this process from /proc (Linux), or ``(None, None)``."""
    return machine.status_bytes("VmRSS"), machine.status_bytes("VmHWM")


def cache_bytes(cache: Any) -> int:
    """Bytes of every tensor storage a cache holds (each storage counted once): ``SinkCache.nbytes``, or for a
    transformers cache what its layers hold."""
    if isinstance(cache, SinkCache):
        return cache.nbytes
    seen: dict[int, int] = {}
    for layer in getattr(cache, "layers", []):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ---- models ------------------------------------------------------------------------------------------------------
def tiny_model(device: torch.device) -> torch.nn.Module:
    """A deterministic random 2-layer Llama (hidden 64, 4 heads, 2 KV heads): per-token cost is mostly overhead,
    so it shows the cache's own cost; it is also what makes a 100,000-token stream affordable on a CPU."""
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         initializer_range=0.15, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).eval()
    model.config._attn_implementation = "sdpa"
    return model


def load(name: str, device: torch.device) -> torch.nn.Module:
    """``tiny`` or ``smollm2`` (SmolLM2-135M-Instruct, float32, from the offline wheel)."""
    if name == "tiny":
        return tiny_model(device)
    from sinkcache.offline import load_model

    return load_model(device=str(device))[0]


# ---- timing ------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers the step it brackets."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, call: Callable[..., Any], **kwargs: Any) -> float:
    """Seconds ``call(**kwargs)`` takes, kernels included."""
    synchronize(device)
    start = time.perf_counter()
    call(**kwargs)
    synchronize(device)
    return time.perf_counter() - start


class Stream:
    """Random token ids fed one at a time; ``next()`` returns a ``[1, 1]`` tensor on the device."""

    def __init__(self, vocab_size: int, length: int, device: torch.device, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab_size, (1, length), generator=generator).to(device)
        self.position = 0

    def take(self, n: int) -> torch.Tensor:
        chunk = self.ids[:, self.position : self.position + n]
        if chunk.shape[1] != n:
            raise ValueError(f"Stream of {self.ids.shape[1]} ids exhausted at {self.position}.")
        self.position += n
        return chunk

    def next(self) -> torch.Tensor:
        return self.take(1)


def summary(seconds: list[float]) -> dict[str, float]:
    """Mean and median of step times, in ms, and the tokens per second the mean gives."""
    mean = statistics.fmean(seconds)
    return {"ms_mean": mean * 1e3, "ms_median": statistics.median(seconds) * 1e3, "tokens_per_s": 1.0 / mean}


def median_of(runs: list[dict[str, Any]], *path: str) -> float:
    """Median over runs of ``run[path[0]][path[1]]...``."""
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        values.append(value)
    return statistics.median(values)


# ---- (a, b, c): decode at a fixed cache size ---------------------------------------------------------------------
@dataclass
class DecodeSettings:
    runs: int
    tokens: int  # decode steps per method per run
    recompute: int  # re-computation forwards per run
    warmup: int = 3


@torch.no_grad()
def decode_comparison(model: torch.nn.Module, name: str, window: int, settings: DecodeSettings,
                      device: torch.device) -> dict[str, Any]:
    """SinkCache vs DynamicCache (both at ``window`` tokens) vs re-computation over ``window`` tokens."""
    enable_streaming(model, window, SINKS)
    ids = Stream(model.config.vocab_size, window + settings.warmup + settings.runs * settings.tokens + 1, device)
    prompt = ids.take(window)
    sink, dynamic = SinkCache(window, SINKS), DynamicCache()
    model(input_ids=prompt, **{CACHE_KWARG: sink})
    model(input_ids=prompt, **{CACHE_KWARG: dynamic}, use_cache=True)
    history = [prompt]  # the re-computation's input: the last `window` tokens of the stream

    def sink_step(token: torch.Tensor) -> None:
        model(input_ids=token, **{CACHE_KWARG: sink})

    def dynamic_step(token: torch.Tensor) -> None:
        model(input_ids=token, **{CACHE_KWARG: dynamic}, use_cache=True)

    def recompute(last: torch.Tensor) -> None:
        model(input_ids=last, use_cache=False, logits_to_keep=1)

    for _ in range(settings.warmup):
        token = ids.next()
        sink_step(token)
        dynamic_step(token)
        dynamic.crop(-1)
        history.append(token)
    runs = []
    for run in range(settings.runs):
        times: dict[str, list[float]] = {"sink": [], "dynamic": [], "recompute": []}
        for i in range(settings.tokens):
            token = ids.next()
            order = (("sink", sink_step), ("dynamic", dynamic_step))
            for method, step in order if (i + run) % 2 == 0 else order[::-1]:
                times[method].append(timed(device, step, token=token))
            dynamic.crop(-1)  # back to `window` cached tokens (a view; not timed)
            history.append(token)
        history = [torch.cat(history, dim=1)[:, -window:]]
        times["recompute"] = [timed(device, recompute, last=history[0]) for _ in range(settings.recompute)]
        result = {method: summary(seconds) for method, seconds in times.items()}
        result["throughput_ratio_sink_vs_dynamic"] = result["dynamic"]["ms_mean"] / result["sink"]["ms_mean"]
        # the same ratio from median steps: insensitive to a few steps slowed by other processes
        result["median_ratio_sink_vs_dynamic"] = result["dynamic"]["ms_median"] / result["sink"]["ms_median"]
        result["speedup_vs_recompute"] = result["recompute"]["ms_mean"] / result["sink"]["ms_mean"]
        runs.append(result)
        print(f"  {name} W={window} run {run + 1}: sink {result['sink']['ms_mean']:.2f} ms, dynamic "
              f"{result['dynamic']['ms_mean']:.2f} ms, recompute {result['recompute']['ms_mean']:.1f} ms", flush=True)
    memory = {"sink_cache_bytes": cache_bytes(sink), "dynamic_cache_bytes": cache_bytes(dynamic)}
    if device.type == "cuda":  # peak allocated during a short separate block per method (interleaving mixes peaks)
        for method, step in (("sink", sink_step), ("dynamic", dynamic_step)):
            machine.reset_peak_memory(device)
            for _ in range(8):
                step(ids.ids[:, -1:])
                if method == "dynamic":
                    dynamic.crop(-1)
            memory[f"{method}_peak_allocated_bytes"] = machine.peak_memory(device)
    return {
        "model": name, "window_length": window, "num_sink_tokens": SINKS, "runs": settings.runs,
        "tokens_per_run": settings.tokens, "recompute_forwards_per_run": settings.recompute,
        **{method: {key: median_of(runs, method, key) for key in ("ms_mean", "ms_median", "tokens_per_s")}
           for method in ("sink", "dynamic", "recompute")},
        **{ratio: median_of(runs, ratio) for ratio in
           ("throughput_ratio_sink_vs_dynamic", "median_ratio_sink_vs_dynamic", "speedup_vs_recompute")},
        "memory": memory, "per_run": runs,
    }


# ---- latency and memory over a long stream -----------------------------------------------------------------------
@dataclass
class StreamSettings:
    tokens: int  # stream length
    window: int
    early: int  # the reference point: latency after this many tokens
    memory_from: int  # memory growth is measured from here to the end
    block: int  # tokens per point of the latency curve (median of the block)
    paired_tokens: int  # tokens per run of the early-vs-late comparison
    dynamic_tokens: int  # length of the DynamicCache contrast stream
    runs: int


def curve_point(tokens: int, latencies: list[float], cache: Any, device: torch.device) -> dict[str, Any]:
    """One point of the plot: block median latency, cache bytes and process memory after ``tokens`` tokens."""
    rss, _ = process_memory()
    point = {"tokens": tokens, "latency_ms": statistics.median(latencies) * 1e3, "cache_bytes": cache_bytes(cache),
             "rss_bytes": rss}
    if device.type == "cuda":
        point["allocated_bytes"] = torch.cuda.memory_allocated(device)
    return point


@torch.no_grad()
def stream_latency(model: torch.nn.Module, settings: StreamSettings, device: torch.device) -> dict[str, Any]:
    """Stream ``settings.tokens`` tokens through a SinkCache; then compare late vs early per-token latency."""
    enable_streaming(model, settings.window, SINKS)
    ids = Stream(model.config.vocab_size, settings.tokens + settings.runs * settings.paired_tokens, device, seed=1)
    cache = SinkCache(settings.window, SINKS)
    curve, block, early_snapshot = [], [], None
    machine.reset_peak_memory(device)
    peak_at_memory_from = None
    start = time.perf_counter()
    for t in range(1, settings.tokens + 1):
        token = ids.next()
        block.append(timed(device, model, input_ids=token, **{CACHE_KWARG: cache}))
        if t == settings.early:
            early_snapshot = copy.deepcopy(cache)  # a cache exactly as it is after `early` tokens
        if t == settings.memory_from:
            peak_at_memory_from = machine.peak_memory(device)
        if t % settings.block == 0:
            curve.append(curve_point(t, block, cache, device))
            block = []
        if t % 10_000 == 0:
            print(f"  stream: {t} tokens, {time.perf_counter() - start:.0f} s", flush=True)
    peak_at_end = machine.peak_memory(device)
    assert early_snapshot is not None
    runs = []
    for run in range(settings.runs):
        young = copy.deepcopy(early_snapshot)
        late_times, early_times = [], []
        for i in range(settings.paired_tokens):
            token = ids.next()
            pair = ((late_times, cache), (early_times, young))
            for times, which in pair if (i + run) % 2 == 0 else pair[::-1]:
                times.append(timed(device, model, input_ids=token, **{CACHE_KWARG: which}))
        late, early = summary(late_times), summary(early_times)
        runs.append({"late": late, "early": early,
                     "latency_ratio_late_vs_early": late["ms_median"] / early["ms_median"],
                     "throughput_ratio_late_vs_early": early["ms_mean"] / late["ms_mean"]})
    cache_sizes = [p["cache_bytes"] for p in curve if p["tokens"] >= settings.memory_from]
    return {
        "model": "tiny", "window_length": settings.window, "num_sink_tokens": SINKS, "tokens": settings.tokens,
        "early_tokens": settings.early, "memory_from_tokens": settings.memory_from, "runs": settings.runs,
        "paired_tokens_per_run": settings.paired_tokens,
        "latency_ms_early": median_of(runs, "early", "ms_median"),
        "latency_ms_late": median_of(runs, "late", "ms_median"),
        "latency_ratio_late_vs_early": median_of(runs, "latency_ratio_late_vs_early"),
        "throughput_ratio_late_vs_early": median_of(runs, "throughput_ratio_late_vs_early"),
        "memory": {
            "kind": "peak allocated (CUDA)" if device.type == "cuda" else "peak resident set size of the process",
            "peak_bytes_at_memory_from": peak_at_memory_from, "peak_bytes_at_end": peak_at_end,
            "peak_growth": (peak_at_end / peak_at_memory_from - 1) if peak_at_memory_from and peak_at_end else None,
            "cache_bytes_min": min(cache_sizes), "cache_bytes_max": max(cache_sizes),
        },
        "per_run": runs, "curve": curve,
    }


@torch.no_grad()
def dynamic_stream(model: torch.nn.Module, settings: StreamSettings, device: torch.device) -> list[dict[str, Any]]:
    """The contrast: the same stream through a DynamicCache, which keeps every token (latency and memory grow)."""
    ids = Stream(model.config.vocab_size, settings.dynamic_tokens, device, seed=1)
    cache, curve, block = DynamicCache(), [], []
    for t in range(1, settings.dynamic_tokens + 1):
        token = ids.next()
        block.append(timed(device, model, input_ids=token, **{CACHE_KWARG: cache}, use_cache=True))
        if t % settings.block == 0:
            curve.append(curve_point(t, block, cache, device))
            block = []
    return curve


# ---- torch.compile -----------------------------------------------------------------------------------------------
COMPILE_WARMUP = 32  # steps before timing: the first compilation, and any recompilation a changing step would cause


def compile_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """Compile the decoder's forward only: the streaming hook runs in the module call, before it, in eager mode."""
    model.base_model.forward = torch.compile(model.base_model.forward, dynamic=False)
    return model


#: The ways a decode step is run: label -> (static_shapes, compiles a separate model, wrap the model); a
#: static_shapes of None is the reference: a DynamicCache holding the same tokens, cropped back after each step.
COMPILE_WAYS: dict[str, tuple[bool | None, bool, Callable[[torch.nn.Module], Callable[..., Any]]]] = {
    "DynamicCache, eager (reference)": (None, False, lambda model: model),
    "default cache, eager": (False, False, lambda model: model),
    "static_shapes, eager": (True, False, lambda model: model),
    "static_shapes, inductor: decoder forward": (True, True, compile_decoder),
    "static_shapes, inductor: whole model": (True, False, lambda model: torch.compile(model, dynamic=False)),
}


@torch.no_grad()
def compile_study(name: str, window: int, tokens: int, runs: int, device: torch.device) -> dict[str, Any]:
    """Decode-step time of a SinkCache with and without static shapes, eager and compiled (inductor), interleaved.

    Every way has its own cache, filled past the window with the same tokens; the compiled ways compile during
    ``COMPILE_WARMUP`` steps. Then each run feeds ``tokens`` tokens to every way in turn (the order rotating token
    by token). Graphs compiled after the warm-up would be recompilations: the static ways must show none.
    """
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_model = enable_streaming(load(name, device), window, SINKS)
    separate = {label: enable_streaming(load(name, device), window, SINKS)
                for label, (_, own_model, _) in COMPILE_WAYS.items() if own_model}
    ids = Stream(eager_model.config.vocab_size, window + 32 + COMPILE_WARMUP + runs * tokens, device, seed=2)
    prefill, warmup = ids.take(window + 32), ids.take(COMPILE_WARMUP)
    ways: dict[str, tuple[Callable[..., Any], Any]] = {}
    result: dict[str, Any] = {"model": name, "window_length": window, "ways": {}}
    for label, (static, own_model, wrap) in COMPILE_WAYS.items():
        model = separate[label] if own_model else eager_model
        if static is None:  # W tokens cached; each step adds one, cropped again outside the timing
            cache: Any = DynamicCache()
            model(input_ids=prefill[:, -window:], **{CACHE_KWARG: cache})
        else:
            cache = SinkCache(window, SINKS, static_shapes=static)
            for start in range(0, prefill.shape[1], window):
                model(input_ids=prefill[:, start : start + window], **{CACHE_KWARG: cache})
        began = time.perf_counter()
        call = wrap(model)
        for i in range(COMPILE_WARMUP):
            call(input_ids=warmup[:, i : i + 1], **{CACHE_KWARG: cache})
            if isinstance(cache, DynamicCache):
                cache.crop(-1)
        result["ways"][label] = {"warmup_s": time.perf_counter() - began}
        ways[label] = (call, cache)
    graphs_after_warmup = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    per_run = []
    for run in range(runs):
        times: dict[str, list[float]] = {label: [] for label in ways}
        order = list(ways)
        for i in range(tokens):
            token = ids.take(1)
            shift = (i + run) % len(order)
            for label in order[shift:] + order[:shift]:
                call, cache = ways[label]
                times[label].append(timed(device, call, input_ids=token, **{CACHE_KWARG: cache}))
                if isinstance(cache, DynamicCache):
                    cache.crop(-1)
        stats = {label: summary(seconds) for label, seconds in times.items()}
        default_ms, static_ms = stats["default cache, eager"]["ms_mean"], stats["static_shapes, eager"]["ms_mean"]
        per_run.append({label: {**stat, "speedup_vs_default_eager": default_ms / stat["ms_mean"],
                                "speedup_vs_static_eager": static_ms / stat["ms_mean"]}
                        for label, stat in stats.items()})
    for label in ways:
        result["ways"][label].update({key: median_of(per_run, label, key) for key in (
            "ms_mean", "ms_median", "speedup_vs_default_eager", "speedup_vs_static_eager")})
    reasons = sorted({reason.splitlines()[0] + " " + reason.split("function `")[-1].split(" at ")[0]
                      for reason in torch._dynamo.utils.counters["graph_break"]})
    result.update({"per_run": per_run, "graph_break_reasons": reasons,
                   "graphs_compiled_after_warmup": torch._dynamo.utils.counters["stats"]["unique_graphs"]
                   - graphs_after_warmup})
    torch._dynamo.reset()
    for label, way in result["ways"].items():
        print(f"  {label}: {way['ms_mean']:.3f} ms, x{way['speedup_vs_default_eager']:.3f} vs default eager",
              flush=True)
    return result


# ---- targets, plot, main -----------------------------------------------------------------------------------------
def targets(results: dict[str, Any], headline_window: int) -> dict[str, dict[str, Any]]:
    """The issue's targets next to what was measured (benchmark results, not assertions)."""
    found: dict[str, dict[str, Any]] = {}
    for row in results["decode"]:
        tag = f"{row['model']}/W={row['window_length']}"
        found[f"throughput sink/dynamic {tag}"] = {
            "target": ">= 1.00", "measured": row["throughput_ratio_sink_vs_dynamic"],
            "met": row["throughput_ratio_sink_vs_dynamic"] >= 1.00}
        if row["window_length"] == headline_window:
            found[f"speedup vs re-computation {tag}"] = {
                "target": ">= 22 (paper, GPU)", "measured": row["speedup_vs_recompute"],
                "met": row["speedup_vs_recompute"] >= 22}
    stream = results.get("stream")
    if stream:
        found["latency late/early (tiny)"] = {
            "target": "within 5%", "measured": stream["latency_ratio_late_vs_early"],
            "met": abs(stream["latency_ratio_late_vs_early"] - 1) <= 0.05}
        growth = stream["memory"]["peak_growth"]
        found["peak memory growth (tiny)"] = {"target": "< 1%", "measured": growth,
                                              "met": growth is not None and growth < 0.01}
    for study in results.get("compile", []):
        for label, way in study["ways"].items():
            if "inductor" in label:
                found[f"torch.compile speedup vs default eager, {label} ({study['model']})"] = {
                    "target": "> 1 (measured)", "measured": way["speedup_vs_default_eager"],
                    "met": way["speedup_vs_default_eager"] > 1}
        found[f"recompilations after warm-up ({study['model']})"] = {
            "target": "0", "measured": study["graphs_compiled_after_warmup"],
            "met": study["graphs_compiled_after_warmup"] == 0}
    return found


def plot(results: dict[str, Any], path: Path) -> None:
    """Latency, cache memory and process memory against tokens streamed, SinkCache vs DynamicCache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stream, dynamic = results["stream"], results["dynamic_stream"]
    series = (("SinkCache", stream["curve"], "tab:blue"), ("DynamicCache", dynamic, "tab:red"))
    memory_key = "allocated_bytes" if "allocated_bytes" in stream["curve"][0] else "rss_bytes"
    panels = (("latency_ms", "per-token latency (ms, block median)", 1),
              ("cache_bytes", "KV cache (MiB)", 2**20),
              (memory_key, "GPU allocated (MiB)" if memory_key == "allocated_bytes" else "process RSS (MiB)", 2**20))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for axis, (key, label, scale) in zip(axes, panels):
        for name, curve, color in series:
            points = [(p["tokens"], p[key] / scale) for p in curve if p.get(key) is not None]
            if points:
                axis.plot(*zip(*points), label=name, color=color, linewidth=1.2)
        axis.set_xlabel("tokens streamed")
        axis.set_ylabel(label)
        axis.set_ylim(0, axis.get_ylim()[1] * 1.05)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"tiny Llama, SinkCache(window_length={stream['window_length']}, num_sink_tokens={SINKS}), "
                    f"{results['machine']['device']}, {results['machine']['torch_threads']} thread(s)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny model only, sizes 64 and 128, a 2,000-token stream, no compile")
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024, 4096], help="cache sizes W (tokens)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; 1 because batch-1 decode gains little from more and a shared machine's "
                             "oversubscribed cores make multi-threaded timings erratic")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (medians are over runs)")
    parser.add_argument("--tiny-tokens", type=int, default=1024, help="decode tokens per method per run, tiny")
    parser.add_argument("--model-tokens", type=int, default=32, help="decode tokens per method per run, SmolLM2")
    parser.add_argument("--recompute", type=int, default=1, help="re-computation forwards per run")
    parser.add_argument("--stream-tokens", type=int, default=100_000, help="length of the tiny model's stream")
    parser.add_argument("--stream-window", type=int, default=1024, help="SinkCache window_length of the stream")
    parser.add_argument("--stream-early", type=int, default=2_000,
                        help="reference point: latency after this many tokens, against after the whole stream")
    parser.add_argument("--stream-memory-from", type=int, default=10_000,
                        help="peak memory growth is measured from this many tokens to the end")
    parser.add_argument("--stream-paired-tokens", type=int, default=500,
                        help="tokens per run of the early-vs-late latency comparison")
    parser.add_argument("--dynamic-stream-tokens", type=int, default=20_000,
                        help="length of the DynamicCache contrast stream (its cost grows with the length)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="measure torch.compile of the decode step (static shapes)")
    parser.add_argument("--compile-models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"],
                        help="models of the torch.compile study (only those also in --models)")
    parser.add_argument("--compile-tokens", type=int, default=300,
                        help="decode tokens per run per way of the study, tiny (SmolLM2: --model-tokens)")
    parser.add_argument("--headline-window", type=int, default=1024, help="W of the re-computation target")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "speed", help="folder for results.json, speed.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.sizes, args.tiny_tokens, args.compile = ["tiny"], [64, 128], 64, False
        args.stream_tokens, args.stream_window, args.stream_early, args.stream_memory_from = 2_000, 64, 200, 500
        args.stream_paired_tokens, args.dynamic_stream_tokens, args.headline_window = 100, 1_000, 128
    if not args.stream_window < args.stream_early < args.stream_memory_from <= args.stream_tokens:
        parser.error("need --stream-window < --stream-early < --stream-memory-from <= --stream-tokens")
    return args


def stream_measurements(args: argparse.Namespace, device: torch.device, results: dict[str, Any]) -> None:
    """The tiny model's long stream, the DynamicCache contrast and (optionally) the torch.compile study."""
    tiny = tiny_model(device)
    settings = StreamSettings(
        tokens=args.stream_tokens, window=args.stream_window, early=args.stream_early,
        memory_from=args.stream_memory_from, block=max(1, args.stream_tokens // 200),
        paired_tokens=args.stream_paired_tokens, dynamic_tokens=args.dynamic_stream_tokens, runs=args.runs)
    print(f"stream: {args.stream_tokens} tokens, tiny model, W={args.stream_window}", flush=True)
    results["stream"] = stream_latency(tiny, settings, device)
    results["dynamic_stream"] = dynamic_stream(tiny, settings, device)
    if args.compile:
        results["compile"] = []
        for name in (model for model in args.compile_models if model in args.models):
            print(f"torch.compile ({name}, W={args.headline_window})", flush=True)
            tokens = args.compile_tokens if name == "tiny" else args.model_tokens
            results["compile"].append(compile_study(name, args.headline_window, tokens, args.runs, device))


def main(argv: Iterable[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": machine.describe(device, args.threads), "command": " ".join(sys.argv),
                               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "decode": []}
    began = time.perf_counter()
    # the tiny model first, with the stream right after it: the stream's process memory is then the tiny model's,
    # not what a larger model left behind
    for name in sorted(args.models, key=lambda model: model != "tiny"):
        model = load(name, device)
        tokens = args.tiny_tokens if name == "tiny" else args.model_tokens
        settings = DecodeSettings(runs=args.runs, tokens=tokens, recompute=args.recompute)
        for window in args.sizes:
            results["decode"].append(decode_comparison(model, name, window, settings, device))
        del model
        if name == "tiny":
            stream_measurements(args, device, results)
    if "stream" not in results:  # --models without tiny
        stream_measurements(args, device, results)
    results["targets"] = targets(results, args.headline_window)
    results["elapsed_s"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    plot(results, args.out / "speed.png")
    print_report(results)
    return results


def print_report(results: dict[str, Any]) -> None:
    """The headline numbers as a markdown table, and the targets."""
    print("\n| model | W | SinkCache tok/s | DynamicCache tok/s | sink/dynamic | re-computation tok/s | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in results["decode"]:
        print(f"| {row['model']} | {row['window_length']} | {row['sink']['tokens_per_s']:.1f} | "
              f"{row['dynamic']['tokens_per_s']:.1f} | {row['throughput_ratio_sink_vs_dynamic']:.3f} | "
              f"{row['recompute']['tokens_per_s']:.2f} | {row['speedup_vs_recompute']:.1f}x |")
    for name, target in results["targets"].items():
        measured = target["measured"]
        shown = f"{measured:.4f}" if isinstance(measured, float) and math.isfinite(measured) else measured
        print(f"{name}: {shown} (target {target['target']}, {'met' if target['met'] else 'not met'})")
    print(f"elapsed {results['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
