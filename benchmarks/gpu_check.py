"""The GPU checks, prepared to run in one go on a CUDA machine (torch and transformers installed, no network).

Run from the repository root::

    python benchmarks/gpu_check.py                        # CUDA: every check, under 8 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --quick   # the same code paths, small, on CPU (CI: seconds)

sinkcache is imported from the repository's ``src`` when it is not installed; the oracle (``tests/oracle.py``) and
the tiny configs (``tests/zoo.py``, which needs no pytest here) come from the repository's ``tests``.

1. **Oracle** (float32 and bfloat16; default and ``static_shapes=True``; one token per call and chunks; every
   architecture of ``tests/zoo.py`` with sdpa, then llama, gemma3, mistral, qwen2 and gpt_oss with eager and with
   flash_attention_2 and flex_attention where importable on CUDA; cases that would start after
   ``--oracle-budget-s`` are skipped with that reason): the logits of a stream through a ``SinkCache`` must equal
   the oracle's (one cache-free forward of the kept tokens at in-cache positions, with an eager-attention copy of the
   same weights, on the same device and dtype) within a tolerance: 1e-4 (CPU) / 1e-3 (CUDA) in float32, and for
   bfloat16 4 % of the largest oracle logit plus 0.1. Each case also runs a negative control (the oracle of a cache
   without sinks): it must differ by more than the tolerance, or the case is reported insensitive (failed).
2. **Tensor parallel** over 2 processes (nccl, one GPU each) where 2 CUDA devices and nccl exist, else skipped with
   the reason (``--tp-cpu`` runs the same job with gloo on CPU): a tiny Llama sharded with its tp plan streams
   one token per call and in chunks through a ``SinkCache`` on every rank; rank 0's logits must match the
   one-process model's within 1e-3 (float32).
3. **Decode throughput and peak memory**, a Llama-3.2-1B-shaped model with random weights in bfloat16 (``--quick``:
   a 2-layer one), ``W`` = 1024 and 4096, batch 1 and 8: ``SinkCache`` (default and ``static_shapes=True``) against
   a ``DynamicCache`` holding ``W`` tokens (cropped back after each step) and a ``StaticCache`` of ``W`` tokens plus
   the decode steps, eager (interleaved token by token, per-run medians and within-run ratios, median over runs),
   then ``SinkCache(static_shapes=True)`` and ``StaticCache`` with the decoder compiled
   (``torch.compile(mode="reduce-overhead")``: CUDA graphs; interleaved with each other; their ratio to the eager
   DynamicCache is one of medians across blocks), W = 1024 batch 1 first, then 4096 batch 8, then the others, while
   ``--budget-s`` allows (the rest is skipped with that reason). Peak memory (``torch.cuda.max_memory_allocated`` on
   CUDA, the process' peak RSS on CPU) is read for each way alone, over 8 decode steps after its prefill and
   warm-up, with only the weights and that cache alive.

Writes ``results.json`` and ``RESULTS.md`` to ``--out`` (default ``docs/speed/gpu/``). Exit status 1 when an oracle or
tensor-parallel check failed, 2 for bad command-line input.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import sinkcache  # noqa: F401 - installed
except ImportError:
    sys.path.insert(0, str(REPO / "src"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.oracle, tests.zoo, tests.tp_worker

import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache  # noqa: E402

from sinkcache import CACHE_KWARG, SinkCache, enable_streaming, machine  # noqa: E402


class Skipped(Exception):
    """A case that cannot run on this machine or release, with the reason."""


def _zoo() -> types.ModuleType:
    """``tests.zoo``; where pytest is not installed (a bare GPU image), with a stand-in whose ``skip`` raises
    ``Skipped`` (the only thing zoo uses pytest for)."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("pytest")

        def skip(reason: str = "", **_: Any) -> NoReturn:
            raise Skipped(reason)

        stand_in.skip = skip  # type: ignore[attr-defined]
        sys.modules["pytest"] = stand_in
    import tests.zoo

    return tests.zoo


def skip_reason(error: BaseException) -> str | None:
    """The reason when ``error`` is a skip (ours, or pytest's when pytest is installed), else None."""
    if isinstance(error, Skipped):
        return str(error)
    if type(error).__name__ == "Skipped" and type(error).__module__.startswith("_pytest"):
        return str(error)
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- 1. the oracle ----------------------------------------------------------------------------------------------
SINKS = 4
ORACLE_WINDOW, ORACLE_STEPS = 16, 72
CHUNKS = [7, 1, 5, 3, 1, 1, 20, 2, 9, 1, 4, 1, 1, 1, 1]


def tolerance(dtype: torch.dtype, device: torch.device, want: torch.Tensor) -> float:
    """The allowed largest |logit difference| against the oracle."""
    if dtype == torch.float32:
        return 1e-4 if device.type == "cpu" else 1e-3
    return 0.04 * float(want.abs().max()) + 0.1


EXTRA_ATTENTION_ARCHS = ["llama", "gemma3", "mistral", "qwen2", "gpt_oss"]


def attention_implementations(device: torch.device, quick: bool) -> list[str]:
    """sdpa, then eager, flash_attention_2 and flex_attention (these two where importable on CUDA)."""
    found = ["sdpa"] if quick else ["sdpa", "eager"]
    if device.type == "cuda":
        if importlib.util.find_spec("flash_attn") is not None:
            found.append("flash_attention_2")
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
            found.append("flex_attention")
    return found


@torch.no_grad()
def oracle_case(arch: str, attn: str, dtype: torch.dtype, static: bool, chunks: list[int],
                device: torch.device) -> dict[str, Any]:
    """One stream through a SinkCache against the oracle on ``device``; raises Skipped where it cannot run."""
    from tests.oracle import contract_visible, oracle_logits

    zoo = _zoo()
    if attn == "flash_attention_2" and dtype == torch.float32:
        raise Skipped("flash_attention_2 runs in 16-bit dtypes only")
    try:
        model = zoo.tiny_model(arch, attn, dtype=dtype).to(device)
        reference = zoo.tiny_model(arch, "eager", dtype=dtype).to(device)  # the same weights (same seed)
    except (ValueError, ImportError) as error:  # e.g. an attention implementation the release cannot load
        raise Skipped(f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
    torch.manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (sum(chunks),))
    enable_streaming(model, ORACLE_WINDOW, SINKS)
    cache = SinkCache(ORACLE_WINDOW, SINKS, static_shapes=static)
    try:
        got, start = [], 0
        for n in chunks:
            ids = tokens[None, start : start + n].to(device)
            got.append(model(input_ids=ids, **{CACHE_KWARG: cache}).logits[0].float())
            start += n
    except ValueError as error:
        if "static_shapes=False" in str(error):  # transformers 5.0-5.1: a model that builds its own mask
            raise Skipped(str(error).splitlines()[0]) from None
        raise
    logits = torch.cat(got)
    with torch.device(device):  # the oracle builds its inputs and masks with default-device factories
        want = oracle_logits(reference, tokens.to(device), contract_visible(chunks, ORACLE_WINDOW, SINKS),
                             SINKS).float()
        control = oracle_logits(reference, tokens.to(device), contract_visible(chunks, ORACLE_WINDOW, 0), 0).float()
    allowed = tolerance(dtype, device, want)
    worst = float((logits - want).abs().max())
    control_difference = float((logits - control).abs().max())
    agree = float((logits.argmax(-1) == want.argmax(-1)).float().mean())
    sensitive = control_difference > allowed
    return {"max_abs_difference": worst, "tolerance": allowed, "argmax_agreement": agree,
            "control_difference": control_difference, "sensitive": sensitive,
            "passed": bool(worst <= allowed and sensitive and torch.isfinite(logits).all())}


def oracle_checks(device: torch.device, quick: bool, budget_s: float) -> dict[str, Any]:
    """Every oracle case: every architecture with sdpa, then ``EXTRA_ATTENTION_ARCHS`` with the other attention
    implementations; failures and skips are recorded, not raised. Cases that would start after ``budget_s`` seconds
    are skipped with that reason."""
    began = time.perf_counter()
    zoo = _zoo()
    archs = ["llama", "gemma3", "mistral"] if quick else sorted(zoo.ARCHITECTURES)
    dtypes = [torch.float32, torch.bfloat16]
    # quick: 40 one-token calls still evict 24 times, move the sinks and re-base the positions
    patterns = {"one_token": [1] * 40} if quick else {"one_token": [1] * ORACLE_STEPS, "chunks": CHUNKS}
    cases: dict[str, Any] = {}
    plan = [(arch, "sdpa") for arch in archs] + [(arch, attn) for attn in attention_implementations(device, quick)[1:]
                                                 for arch in EXTRA_ATTENTION_ARCHS]
    for arch, attn in plan:
        for dtype in dtypes:
            for static in (False, True):
                for pattern, chunks in patterns.items():
                    name = f"{arch}/{attn}/{str(dtype).removeprefix('torch.')}/" \
                           f"{'static' if static else 'default'}/{pattern}"
                    if time.perf_counter() - began > budget_s:
                        cases[name] = {"skipped": f"oracle time budget ({budget_s:.0f} s) spent"}
                        continue
                    try:
                        cases[name] = oracle_case(arch, attn, dtype, static, chunks, device)
                    except Exception as error:  # noqa: BLE001 - every failure is a result to report
                        reason = skip_reason(error)
                        cases[name] = ({"skipped": reason} if reason is not None else
                                       {"passed": False, "error": f"{type(error).__name__}: {error}"[:500]})
                    release(device)
    ran = [c for c in cases.values() if "skipped" not in c]
    failed = sorted(name for name, c in cases.items() if "skipped" not in c and not c["passed"])
    print(f"oracle: {len(ran) - len(failed)} of {len(ran)} cases passed, {len(cases) - len(ran)} skipped"
          + (f"; FAILED: {', '.join(failed[:12])}" + (" ..." if len(failed) > 12 else "") if failed else ""),
          flush=True)
    return {"cases": cases, "passed": len(ran) - len(failed), "failed": failed, "skipped": len(cases) - len(ran)}


# ---- 2. tensor parallel -----------------------------------------------------------------------------------------
TP_CHUNKS = [1] * 40 + [9, 3, 17, 1, 1]


def tp_unavailable(device: torch.device, cpu: bool) -> str | None:
    """Why the 2-process tensor-parallel case cannot run here, or None."""
    if not torch.distributed.is_available():
        return "this torch build has no torch.distributed"
    if cpu:
        return None if torch.distributed.is_gloo_available() else "this torch build has no gloo backend"
    if device.type != "cuda":
        return "not on CUDA (run with --tp-cpu for the gloo job on CPU)"
    if not torch.distributed.is_nccl_available():
        return "this torch build has no nccl backend"
    if torch.cuda.device_count() < 2:
        return f"needs 2 CUDA devices, this machine has {torch.cuda.device_count()}"
    return None


@torch.no_grad()
def tp_stream(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Logits ``[tokens, vocab]`` (float32, CPU) of the tensor-parallel stream through a SinkCache."""
    enable_streaming(model, ORACLE_WINDOW, SINKS)
    ids = torch.randint(3, model.config.vocab_size, (1, sum(TP_CHUNKS)), generator=torch.Generator().manual_seed(0))
    cache, out, start = SinkCache(ORACLE_WINDOW, SINKS), [], 0
    for n in TP_CHUNKS:
        out.append(model(input_ids=ids[:, start : start + n].to(device), **{CACHE_KWARG: cache}).logits[0].float())
        start += n
    return torch.cat(out).cpu()


def tp_worker(model_dir: str, out: str) -> None:
    """Run under torchrun: load ``model_dir`` sharded with its tp plan, stream, save rank 0's logits."""
    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "examples"))
    from tensor_parallel import load_tensor_parallel

    torch.set_num_threads(1)
    model = load_tensor_parallel(model_dir)
    device = next(model.parameters()).device
    logits = tp_stream(model, device)
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "device": str(device), "backend": dist.get_backend(),
                    "kv_heads_per_rank": int(model.config.num_key_value_heads) // dist.get_world_size()}, out)
    dist.barrier()
    dist.destroy_process_group()


def tensor_parallel(device: torch.device, cpu: bool, timeout: float = 240) -> dict[str, Any]:
    """The 2-process job, against the one-process model."""
    reason = tp_unavailable(device, cpu)
    if reason:
        print(f"tensor parallel: skipped: {reason}", flush=True)
        return {"skipped": reason}
    sys.path.insert(0, str(REPO / "examples"))
    from tensor_parallel import tiny_llama

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        model_dir, out = tiny_llama(Path(folder) / "model"), Path(folder) / "rank0.pt"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}
        if cpu:
            env.update(GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="")
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(port), str(Path(__file__).resolve()),
                   "--tp-worker", str(model_dir), str(out)]
        try:
            run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"passed": False, "error": f"the torchrun job did not finish in {timeout:.0f} s"}
        if run.returncode != 0 or not out.exists():
            return {"passed": False, "error": f"torchrun exit {run.returncode}: {run.stderr[-1500:]}"}
        sharded = torch.load(out)
        plain_device = torch.device("cpu") if cpu else device
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(plain_device).eval()
        want = tp_stream(plain, plain_device)
    worst = float((sharded["logits"] - want).abs().max())
    result = {"backend": sharded["backend"], "device": sharded["device"], "ranks": 2,
              "kv_heads_per_rank": sharded["kv_heads_per_rank"], "max_abs_difference": worst, "tolerance": 1e-3,
              "passed": worst <= 1e-3, "elapsed_s": time.perf_counter() - began}
    print(f"tensor parallel ({result['backend']}): max |difference| {worst:.2e} "
          f"({'passed' if result['passed'] else 'FAILED'})", flush=True)
    return result


# ---- 3. throughput and memory -----------------------------------------------------------------------------------
def llama_1b(device: torch.device, quick: bool) -> torch.nn.Module:
    """A Llama-3.2-1B-shaped model (16 layers, hidden 2048, 32 heads, 8 key/value heads of 64, vocab 128256, llama3
    rope) with random weights in bfloat16; ``quick``: 2 layers of hidden 64."""
    shape: dict[str, Any] = dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    if quick:
        shape.update(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config = AutoConfig.for_model("llama", **shape, max_position_embeddings=131072, rope_parameters=dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192, rope_theta=500000.0))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.eval()


class Way:
    """One way of decoding: a cache kind, eager or with the compiled decoder."""

    def __init__(self, label: str, kind: str, compiled: bool):
        self.label, self.kind, self.compiled = label, kind, compiled

    def new_cache(self, model: torch.nn.Module, window: int, capacity: int) -> Any:
        if self.kind == "dynamic":
            return DynamicCache()
        if self.kind == "static_cache":
            return StaticCache(config=model.config, max_cache_len=capacity)
        return SinkCache(window, SINKS, static_shapes=self.kind == "sink_static")


EAGER_WAYS = [Way("SinkCache", "sink", False), Way("SinkCache(static_shapes)", "sink_static", False),
              Way("DynamicCache", "dynamic", False), Way("StaticCache", "static_cache", False)]
COMPILED_WAYS = [Way("SinkCache(static_shapes), compiled", "sink_static", True),
                 Way("StaticCache, compiled", "static_cache", True)]


class Decoder:
    """Steps of one way: ``prefill`` then one-token ``step``s, keeping the stream position for the caches that
    need explicit positions (StaticCache) and cropping the DynamicCache back to ``window`` tokens."""

    def __init__(self, model: torch.nn.Module, way: Way, window: int, batch: int, capacity: int,
                 device: torch.device):
        self.model, self.way, self.window, self.device = model, way, window, device
        self.cache = way.new_cache(model, window, capacity)
        self.batch, self.position = batch, 0

    def call(self, ids: torch.Tensor) -> None:
        extra: dict[str, Any] = {}
        if self.way.kind == "static_cache":  # positions as a tensor: an int would specialise a compiled graph
            extra["position_ids"] = (torch.arange(ids.shape[1], device=self.device) + self.position)[None].expand(
                ids.shape[0], -1)
        self.model(input_ids=ids, **{CACHE_KWARG: self.cache}, use_cache=True, logits_to_keep=1, **extra)
        self.position += ids.shape[1]
        if self.way.kind == "dynamic" and self.position > self.window:
            self.cache.crop(self.window - self.position)  # back to `window` tokens: every step sees W + 1 keys
            self.position = self.window

    def prefill(self, ids: torch.Tensor) -> None:
        for start in range(0, ids.shape[1], self.window):
            self.call(ids[:, start : start + self.window])

    def cache_bytes(self) -> int:
        if isinstance(self.cache, SinkCache):
            return self.cache.nbytes
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for layer in self.cache.layers
                    for t in vars(layer).values() if isinstance(t, torch.Tensor) and t.numel()}
        return sum(storages.values())


def compile_decoder(model: torch.nn.Module, original: Callable[..., Any], device: torch.device) -> None:
    """The decoder's forward compiled (CUDA graphs on CUDA); the streaming hook stays outside, in eager mode."""
    import torch._dynamo

    torch._dynamo.reset()
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    model.base_model.forward = torch.compile(original, mode=mode, dynamic=False)


def timed(device: torch.device, decoder: Decoder, ids: torch.Tensor) -> float:
    synchronize(device)
    start = time.perf_counter()
    decoder.call(ids)
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def memory_block(model: torch.nn.Module, way: Way, window: int, batch: int, ids: torch.Tensor, warmup: int,
                 device: torch.device) -> dict[str, Any]:
    """A way alone: prefill ``window`` tokens, ``warmup`` steps (compilation), then the peak over 8 decode steps."""
    release(device)
    decoder = Decoder(model, way, window, batch, ids.shape[1] + 1, device)
    began = time.perf_counter()
    decoder.prefill(ids[:, :window])
    for t in range(warmup):
        decoder.call(ids[:, window + t : window + t + 1])
    synchronize(device)
    warm_s = time.perf_counter() - began
    machine.reset_peak_memory(device)
    for t in range(8):
        decoder.call(ids[:, window + warmup + t : window + warmup + t + 1])
    synchronize(device)
    result = {"decode_peak_bytes": machine.peak_memory(device), "cache_bytes": decoder.cache_bytes(),
              "warmup_s": warm_s}
    del decoder
    release(device)
    return result


@torch.no_grad()
def interleaved(model: torch.nn.Module, ways: list[Way], window: int, batch: int, ids: torch.Tensor, warmup: int,
                runs: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Every way with its own cache, stepped token by token in a rotating order; per-run median step times."""
    import torch._dynamo

    decoders = {w.label: Decoder(model, w, window, batch, ids.shape[1] + 1, device) for w in ways}
    for decoder in decoders.values():
        decoder.prefill(ids[:, :window])
        for t in range(warmup):
            decoder.call(ids[:, window + t : window + t + 1])
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    per_run = []
    at = window + warmup
    for run in range(runs):
        times: dict[str, list[float]] = {label: [] for label in decoders}
        order = list(decoders)
        for i in range(steps):
            token = ids[:, at : at + 1]
            at += 1
            shift = (i + run) % len(order)
            for label in order[shift:] + order[:shift]:
                times[label].append(timed(device, decoders[label], token))
        per_run.append({label: statistics.median(seconds) for label, seconds in times.items()})
    result: dict[str, Any] = {}
    for label in decoders:
        median_s = statistics.median(run[label] for run in per_run)
        result[label] = {"ms_per_step": median_s * 1e3, "tokens_per_s": batch / median_s,
                         "per_run_ms": [run[label] * 1e3 for run in per_run]}
    reference = next((label for label in decoders if label == "DynamicCache"), None)
    if reference:
        for label in decoders:
            result[label]["speed_vs_DynamicCache"] = statistics.median(
                run[reference] / run[label] for run in per_run)
    if len(decoders) == 2 and not reference:  # the compiled pair
        first, second = list(decoders)
        result[first][f"speed_vs_{second}"] = statistics.median(run[second] / run[first] for run in per_run)
    result["graphs_compiled_while_timed"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    del decoders
    release(device)
    return result


def throughput(device: torch.device, quick: bool, budget_s: float, began: float, compile_ways: bool
               ) -> dict[str, Any]:
    """Decode throughput and peak memory per W and batch: every case eager, then the compiled ways in the order of
    ``COMPILE_ORDER`` while ``budget_s`` (counted from ``began``) allows."""
    import torch._dynamo

    model = llama_1b(device, quick)
    original = model.base_model.forward
    sizes, batches = ([32, 64], [1, 2]) if quick else ([1024, 4096], [1, 8])
    runs, steps, warmup = (3, 8, 3) if quick else (3, 32, 4)
    compile_warmup = 6  # CUDA graphs are recorded on a later call of a shape than the first
    results: dict[str, Any] = {"model": "Llama-3.2-1B-shaped, random weights, bfloat16" if not quick else
                               "2-layer Llama (quick), random weights, bfloat16", "num_sink_tokens": SINKS,
                               "runs": runs, "steps_per_run": steps, "cases": []}
    stream: dict[tuple[int, int], torch.Tensor] = {}
    for window in sizes:
        enable_streaming(model, window, SINKS)
        for batch in batches:
            total = window + compile_warmup + 8 + runs * steps + 1
            ids = stream[window, batch] = torch.randint(
                3, model.config.vocab_size, (batch, total), generator=torch.Generator().manual_seed(batch)).to(device)
            case: dict[str, Any] = {"window_length": window, "batch": batch, "memory": {},
                                    "compiled": {"skipped": "--no-compile"}}
            for way in EAGER_WAYS:
                case["memory"][way.label] = memory_block(model, way, window, batch, ids, warmup, device)
            case["eager"] = eager = interleaved(model, EAGER_WAYS, window, batch, ids, warmup, runs, steps, device)
            print(f"eager W={window} batch={batch}: " + ", ".join(
                f"{w.label} {eager[w.label]['tokens_per_s']:.0f} tok/s (x{eager[w.label]['speed_vs_DynamicCache']:.2f})"
                for w in EAGER_WAYS), flush=True)
            results["cases"].append(case)
    if not compile_ways:
        return results
    compile_cost = 75.0  # seconds per way and shape, assumed until the first compilation is measured
    by_shape = {(c["window_length"], c["batch"]): c for c in results["cases"]}
    order = sorted(by_shape, key=lambda shape: (shape != (sizes[0], 1), shape != (sizes[-1], batches[-1])))
    for window, batch in order:
        case, ids = by_shape[window, batch], stream[window, batch]
        left = budget_s - (time.perf_counter() - began)
        if left < 2 * compile_cost + 30:
            case["compiled"] = {"skipped": f"time budget: {left:.0f} s left of --budget-s, compiling both ways takes "
                                           f"about {2 * compile_cost:.0f} s"}
            continue
        enable_streaming(model, window, SINKS)
        torch._dynamo.utils.counters.clear()
        compile_decoder(model, original, device)
        first = time.perf_counter()
        for way in COMPILED_WAYS:
            case["memory"][way.label] = memory_block(model, way, window, batch, ids, compile_warmup, device)
        compile_cost = (time.perf_counter() - first) / len(COMPILED_WAYS)
        compiled = interleaved(model, COMPILED_WAYS, window, batch, ids, compile_warmup, runs, steps, device)
        dynamic_ms = case["eager"]["DynamicCache"]["ms_per_step"]
        for way in COMPILED_WAYS:  # across blocks: a ratio of medians, not side by side
            compiled[way.label]["speed_vs_eager_DynamicCache_medians"] = dynamic_ms / compiled[way.label]["ms_per_step"]
        compiled["inductor_cudagraph_counters"] = {
            k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if "cudagraph" in k}
        compiled["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
        case["compiled"] = compiled
        model.base_model.forward = original
        torch._dynamo.reset()
        print(f"compiled W={window} batch={batch}: " + ", ".join(
            f"{w.label} {compiled[w.label]['tokens_per_s']:.0f} tok/s" for w in COMPILED_WAYS)
            + f" (graphs compiled while timed: {compiled['graphs_compiled_while_timed']})", flush=True)
    del model
    release(device)
    return results


# ---- report and command line ------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    """The short summary: oracle and tensor-parallel outcome, the throughput and memory table."""
    lines = [f"# GPU check ({results['machine']['device']}, {results['machine'].get('gpu', 'no GPU')})", "",
             f"`{results['command']}`: torch {results['machine']['torch']}, transformers "
             f"{results['machine']['transformers']}, {results['elapsed_s']:.0f} s.", ""]
    oracle = results["oracle"]
    lines += [f"**Oracle**: {oracle['passed']} passed, {len(oracle['failed'])} failed, {oracle['skipped']} skipped"
              + (f" (failed: {', '.join(oracle['failed'])})" if oracle["failed"] else "") + ".", ""]
    tp = results["tensor_parallel"]
    lines += ["**Tensor parallel**: " + (f"skipped: {tp['skipped']}" if "skipped" in tp else
              f"{'passed' if tp.get('passed') else 'FAILED'} ({tp.get('backend')}, max |difference| "
              f"{tp.get('max_abs_difference', float('nan')):.2e})" if "error" not in tp else f"FAILED: {tp['error']}")
              + ".", ""]
    speed = results["throughput"]
    lines += [f"**Decode** ({speed['model']}; median over {speed['runs']} runs of {speed['steps_per_run']} interleaved "
              "steps; speed relative to DynamicCache within each run; peak: decode steps of that way alone, weights "
              "included):", "",
              "| W | batch | way | tokens/s | x DynamicCache | cache MiB | peak MiB |",
              "|---:|---:|---|---:|---:|---:|---:|"]
    for case in speed["cases"]:
        rows = [(w.label, case["eager"][w.label]) for w in EAGER_WAYS]
        if case["compiled"] and "skipped" not in case["compiled"]:
            rows += [(w.label, case["compiled"][w.label]) for w in COMPILED_WAYS]
        for label, row in rows:
            memory = case["memory"].get(label, {})
            ratio = row.get("speed_vs_DynamicCache") or row.get("speed_vs_eager_DynamicCache_medians")
            peak = memory.get("decode_peak_bytes")
            lines.append(f"| {case['window_length']} | {case['batch']} | {label} | {row['tokens_per_s']:.1f} | "
                         f"{f'{ratio:.3f}' if ratio else '-'} | {memory.get('cache_bytes', 0) / 2**20:.1f} | "
                         f"{f'{peak / 2**20:.0f}' if peak else '-'} |")
        if case["compiled"] and "skipped" in case["compiled"]:
            lines.append(f"| {case['window_length']} | {case['batch']} | compiled | skipped: "
                         f"{case['compiled']['skipped']} | | | |")
    return "\n".join(lines) + "\n"


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = OneLineErrors(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="3 architectures, one-token streams, a 2-layer model at W = 32 and 64, no compiling")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the compiled decoder (default: on, except with --quick)")
    parser.add_argument("--tp-cpu", action="store_true", help="run the tensor-parallel job with gloo on CPU")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="compiled cases that would end past this many seconds (from the start) are skipped")
    parser.add_argument("--oracle-budget-s", type=float, default=120.0,
                        help="oracle cases that would start after this many seconds are skipped")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "speed" / "gpu",
                        help="folder for results.json and RESULTS.md")
    parser.add_argument("--tp-worker", nargs=2, metavar=("MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tp_worker:
        return args
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (cuda, cuda:N or cpu)")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.budget_s <= 0 or args.oracle_budget_s <= 0:
        parser.error("--budget-s and --oracle-budget-s must be > 0")
    args.device = device
    if args.compile is None:
        args.compile = not args.quick
    return args


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tp_worker:
        tp_worker(*args.tp_worker)
        return 0
    device: torch.device = args.device
    if device.type == "cuda":
        if device.index is not None:  # set_device refuses a device without an index
            torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    began = time.perf_counter()
    results: dict[str, Any] = {"machine": machine.describe(device, torch.get_num_threads()),
                               "command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]),
                               "transformers": transformers.__version__, "cache_kwarg": CACHE_KWARG}
    results["oracle"] = oracle_checks(device, args.quick, args.oracle_budget_s)
    results["tensor_parallel"] = tensor_parallel(device, args.tp_cpu)
    results["throughput"] = throughput(device, args.quick, args.budget_s, began, args.compile)
    results["elapsed_s"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    text = markdown(results)
    (args.out / "RESULTS.md").write_text(text)
    print("\n" + text)
    tp = results["tensor_parallel"]
    failed = bool(results["oracle"]["failed"]) or ("skipped" not in tp and not tp.get("passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
