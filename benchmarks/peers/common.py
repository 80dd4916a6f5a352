"""The protocol every peer script runs, in its own virtual environment (no sinkcache import: it must run on
transformers 4.34 as on 5.x).

Inputs, shared by file so that no peer tokenizes or loads anything differently (``run.py`` writes them):

* ``inputs.json``: ``token_ids`` (the stream: the first ids of the bundled text as sinkcache's perplexity benchmark
  tokenizes it, no BOS) and ``model_dir`` (SmolLM2-135M-Instruct de-quantised from the bundled GGUF to float32 and
  saved as safetensors with a config every transformers release from 4.34 reads).

What a peer script measures (``measure``), with one torch thread:

* perplexity per regime (``dense``: the venv's plain cache; ``window``: the peer with 0 sinks; ``sink``: the peer
  with ``num_sink_tokens`` sinks), feeding one token per forward call and scoring token ``t + 1`` from the logits of
  token ``t``, exactly as ``sinkcache.perplexity.stream_nll`` does;
* what each token attends to, observed in the attention itself (``AttentionObserver``), not read from settings;
* decode speed as a ratio to the venv's plain cache, interleaved step by step in the same process (``speed_ratio``);
* optionally a long stream, fed ``long_chunk`` tokens per call (``sink`` regime only).

The result is one JSON file (``--output``); a peer that cannot be configured or fails writes its error there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
TORCH_REQUIREMENT = "torch==2.13.0"  # first and pinned, as in .ci/run: a bare `torch` pulls a CUDA build


# ---- the virtual environment -----------------------------------------------------------------------------------
def ensure_venv(name: str, requirements: Sequence[str], output: Path | None) -> None:
    """Run the calling script inside ``VENVS/name``, building that venv first (torch, then ``requirements``).

    Returns only when the interpreter already is the venv's; otherwise replaces the process with the venv's python
    running the same command line. If the venv cannot be built, writes ``{"status": "failed", "error": ...}`` to
    ``output`` (when given) and exits with status 3.
    """
    venv = VENVS / name
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    python = venv / "bin" / "python"
    marker = venv / ".built"
    if not marker.is_file():
        print(f"[{name}] building {venv} ({TORCH_REQUIREMENT}, then {' '.join(requirements)})", flush=True)
        steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", TORCH_REQUIREMENT],
                 [str(python), "-m", "pip", "install", "-q", *requirements]]
        for command in steps:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                lines = [line for line in (done.stderr or done.stdout).splitlines()
                         if line.strip() and not line.startswith("WARNING: Location")]
                error = f"`{' '.join(command[2:])}` failed: " + " / ".join(lines[-3:])
                print(f"[{name}] cannot build its environment: {error}", file=sys.stderr)
                if output is not None:
                    write_json(output, {"peer": name, "status": "failed", "stage": "environment", "error": error,
                                        "requirements": [TORCH_REQUIREMENT, *requirements]})
                sys.exit(3)
        marker.write_text("\n".join(requirements) + "\n")
    os.execv(str(python), [str(python), sys.argv[0], *sys.argv[1:]])


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def parser(description: str) -> argparse.ArgumentParser:
    """The command line every peer script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--inputs", type=Path, required=True, help="inputs.json written by run.py")
    p.add_argument("--output", type=Path, required=True, help="the result JSON")
    p.add_argument("--num-tokens", type=int, default=4096, help="tokens scored in window and sink")
    p.add_argument("--window-tokens", type=int, default=None, help="tokens scored in window (default: --num-tokens)")
    p.add_argument("--dense-tokens", type=int, default=1024, help="tokens scored in dense (the plain cache)")
    p.add_argument("--window-length", type=int, default=128, help="cache size, sinks included")
    p.add_argument("--num-sink-tokens", type=int, default=4)
    p.add_argument("--speed-windows", default="128,1024", help="cache sizes of the speed ratio; empty: none")
    p.add_argument("--speed-steps", type=int, default=24, help="timed one-token steps per cache and run")
    p.add_argument("--speed-runs", type=int, default=3, help="runs; the ratio is their median")
    p.add_argument("--long-tokens", type=int, default=0, help="tokens of the long stream (0: none)")
    p.add_argument("--long-chunk", type=int, default=16, help="tokens per call in the long stream")
    p.add_argument("--observe-layers", default="1,29", help="layers whose attention is observed")
    return p


# ---- what each token attends to -------------------------------------------------------------------------------
def ranges(positions: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 9, 10]`` as ``"0-3,9-10"`` (sorted first)."""
    out: list[str] = []
    items = sorted(positions)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


def expected_keys(t: int, window_length: int, num_sink_tokens: int) -> set[int]:
    """StreamingLLM's attended set for token ``t`` fed one per call: the cache (the first ``num_sink_tokens``
    tokens and the most recent ``window_length - num_sink_tokens`` before ``t``, everything while ``t <=
    window_length``) and ``t`` itself: sinkcache's position contract."""
    if t <= window_length:
        return set(range(t + 1))
    return set(range(num_sink_tokens)) | set(range(t - (window_length - num_sink_tokens), t + 1))


class AttentionObserver:
    """Which stream positions each one-token step's attention reads, in chosen layers and every key/value head.

    Each new token's value rows (the output of ``v_proj`` in an observed layer, one row per key/value head) are
    recorded as fingerprints of its stream position. ``torch.nn.functional.scaled_dot_product_attention`` and
    ``torch.matmul`` (the eager ``weights @ values`` of older releases) are wrapped: a call whose value operand's rows
    are fingerprints of an observed layer is that layer's attention, and its rows (less those the attention mask
    hides) are the keys the step attended to. Values are never rotated, and every cache copies them bit for bit,
    so the match is exact; a row that matches nothing and is not masked counts as ``unknown``.

    Use: ``with observer: ...``; call ``begin(t)`` before feeding stream token ``t``, ``end()`` after its forward.
    """

    def __init__(self, model: Any, layers: Sequence[int], window_length: int, num_sink_tokens: int):
        import torch

        self.torch = torch
        config = model.config
        self.num_heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.layers = list(layers)
        self.window_length, self.num_sink_tokens = window_length, num_sink_tokens
        self.prints: dict[int, list[dict[bytes, int]]] = {i: [{} for _ in range(self.kv_heads)] for i in self.layers}
        self.modules = [model.model.layers[i].self_attn.v_proj for i in self.layers]
        self.position = -1
        self.seen: dict[int, list[list[int]]] = {}
        self.unknown = 0
        self.collisions = 0
        self.stats = {"steps": 0, "exact": 0, "sinks_plus_recent": 0, "sinks_kept": 0, "min_keys": None,
                      "max_keys": None,
                      "first_mismatch": None, "last_step": None}

    # fingerprints
    def _hook(self, layer: int) -> Callable[..., None]:
        def record(module: Any, args: Any, output: Any) -> None:
            if self.position < 0:
                return
            rows = output[0, -1].detach().float().reshape(self.kv_heads, self.head_dim)
            for head in range(self.kv_heads):
                key = rows[head].numpy().tobytes()
                if key in self.prints[layer][head]:
                    self.collisions += 1
                self.prints[layer][head][key] = self.position
        return record

    def _look(self, value: Any, mask: Any) -> None:
        torch = self.torch
        if self.position < 0 or not isinstance(value, torch.Tensor) or value.dim() != 4 \
                or value.shape[-1] != self.head_dim:
            return
        groups = value.shape[1] // self.kv_heads if value.shape[1] % self.kv_heads == 0 else 1
        first = value[0, 0].detach().float()
        for layer in self.layers:
            table = self.prints[layer][0]
            if first[-1].numpy().tobytes() not in table and first[0].numpy().tobytes() not in table:
                continue
            allowed = None
            if isinstance(mask, torch.Tensor):
                row = mask[0, 0, -1] if mask.dim() == 4 else mask.reshape(-1, mask.shape[-1])[-1]
                allowed = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
            heads = []
            for head in range(self.kv_heads):
                rows = value[0, head * groups].detach().float()
                found = []
                for k in range(rows.shape[0]):
                    if allowed is not None and not bool(allowed[k]):
                        continue
                    position = self.prints[layer][head].get(rows[k].numpy().tobytes())
                    if position is None:
                        self.unknown += 1
                        position = -1
                    found.append(position)
                heads.append(found)
            self.seen[layer] = heads
            return

    def __enter__(self) -> AttentionObserver:
        torch = self.torch
        self.handles = [module.register_forward_hook(self._hook(layer))
                        for layer, module in zip(self.layers, self.modules)]
        self.sdpa, self.matmul = torch.nn.functional.scaled_dot_product_attention, torch.matmul
        observer = self

        def sdpa(query: Any, key: Any, value: Any, attn_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
            observer._look(value, attn_mask)
            return observer.sdpa(query, key, value, attn_mask, *args, **kwargs)

        def matmul(a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[-2] == 1:
                observer._look(b, None)
            return observer.matmul(a, b, *args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = sdpa
        torch.matmul = matmul
        return self

    def __exit__(self, *exc: object) -> None:
        torch = self.torch
        torch.nn.functional.scaled_dot_product_attention, torch.matmul = self.sdpa, self.matmul
        for handle in self.handles:
            handle.remove()

    # steps
    def begin(self, t: int) -> None:
        """Stream token ``t`` is fed next (alone)."""
        self.position, self.seen = t, {}

    def end(self) -> None:
        """Check what the step attended to against StreamingLLM's set and keep the counts."""
        t, stats = self.position, self.stats
        expected = expected_keys(t, self.window_length, self.num_sink_tokens)
        sinks = set(range(min(self.num_sink_tokens, t + 1)))
        exact, kept, shaped = True, True, True
        missing = [layer for layer in self.layers if layer not in self.seen]
        for layer in self.layers:
            for head, found in enumerate(self.seen.get(layer, [])):
                keys = len(found)
                stats["min_keys"] = keys if stats["min_keys"] is None else min(stats["min_keys"], keys)
                stats["max_keys"] = keys if stats["max_keys"] is None else max(stats["max_keys"], keys)
                if set(found) != expected or keys != len(expected):
                    exact = False
                    if stats["first_mismatch"] is None:
                        stats["first_mismatch"] = {"token": t, "layer": layer, "kv_head": head, "keys": keys,
                                                   "positions": ranges([p for p in found if p >= 0]),
                                                   "unknown_rows": found.count(-1),
                                                   "expected": ranges(sorted(expected))}
                kept = kept and sinks <= set(found)
                recent = sorted(set(found) - sinks)  # sinks + one unbroken run of tokens ending at t itself?
                shaped = shaped and sinks <= set(found) and len(found) == len(set(found)) and \
                    (recent == list(range(recent[0], t + 1)) if recent else t < len(sinks))
        if missing:
            exact = kept = shaped = False
            if stats["first_mismatch"] is None:
                stats["first_mismatch"] = {"token": t, "error": f"no attention observed in layers {missing}"}
        stats["steps"] += 1
        stats["exact"] += exact
        stats["sinks_kept"] += kept
        stats["sinks_plus_recent"] += shaped
        first = self.seen.get(self.layers[0], [[]])
        stats["last_step"] = {"token": t, "keys_per_kv_head": [len(f) for f in first],
                              "positions_kv_head_0": ranges([p for p in first[0] if p >= 0])}
        self.position = -1

    def summary(self) -> dict[str, Any]:
        """The counts: steps observed; ``exact``: steps whose every observed head read exactly StreamingLLM's set
        (``expected``); ``sinks_plus_recent``: steps whose every head read the sinks plus one unbroken run of
        recent tokens ending at the token itself, each once (StreamingLLM's shape, whatever the run's length);
        ``sinks_kept``: steps that read every sink in every head; key counts; the first mismatch; the last step."""
        return {**self.stats, "layers": self.layers, "kv_heads": self.kv_heads, "unknown_rows": self.unknown,
                "fingerprint_collisions": self.collisions,
                "expected": f"the first {self.num_sink_tokens} tokens + the most recent "
                            f"{self.window_length - self.num_sink_tokens} + itself"}


# ---- streams, perplexity, speed ---------------------------------------------------------------------------------
Step = Callable[[Any], Any]  # feeds [1, n] ids (the next n stream tokens), returns [n, vocab] logits
StreamFactory = Callable[[], Step]


def stream_nll(step: Step, ids: Any, chunk: int = 1, observer: AttentionObserver | None = None,
               label: str = "") -> tuple[list[float], float]:
    """NLL (nats) of ``ids[1:]`` feeding ``ids[:-1]`` ``chunk`` tokens per call through ``step``; and seconds."""
    import torch

    nll: list[float] = []
    inputs, targets = ids[:-1], ids[1:]
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(inputs), chunk):
            last = min(first + chunk, len(inputs))
            if observer is not None:
                observer.begin(first)
            logits = step(inputs[None, first:last])
            if observer is not None:
                observer.end()
            losses = torch.nn.functional.cross_entropy(logits.float(), targets[first:last], reduction="none")
            nll += losses.double().tolist()
            if label and (last // chunk) % 512 == 0:
                print(f"  {label}: {last}/{len(inputs)} tokens, {time.perf_counter() - start:.0f} s", flush=True)
    return nll, time.perf_counter() - start


def perplexity(nll: Sequence[float]) -> float:
    """``exp(mean NLL)``."""
    return math.exp(sum(nll) / len(nll))


def running(nll: Sequence[float], every: int = 32) -> list[list[float]]:
    """``[[tokens, running perplexity], ...]`` every ``every`` tokens (and at the end), for the plot."""
    out, total = [], 0.0
    for i, value in enumerate(nll, 1):
        total += value
        if i % every == 0 or i == len(nll):
            out.append([i, math.exp(total / i)])
    return out


def speed_ratio(peer: StreamFactory, plain: StreamFactory, ids: Any, window_length: int, steps: int,
                runs: int) -> dict[str, Any]:
    """Decode tokens/s of ``peer`` over ``plain``, both holding ``window_length`` tokens, interleaved step by step.

    Each run fills a fresh peer stream and a fresh plain stream with the stream's first ``window_length`` tokens in
    one call, runs 4 untimed one-token steps in each, then ``steps`` timed one-token steps alternating between them
    (which goes first alternates too); the run's ratio is plain seconds / peer seconds (> 1: the peer is faster).
    The plain cache grows by ``steps + 4`` tokens over the run; the peer's stays at ``window_length``.
    """
    import torch

    ratios, peer_ms, plain_ms = [], [], []
    with torch.no_grad():
        for _ in range(runs):
            streams = {"peer": peer(), "plain": plain()}
            for step in streams.values():
                step(ids[None, :window_length])
            seconds = {"peer": 0.0, "plain": 0.0}
            for i in range(4 + steps):
                token = ids[None, window_length + i: window_length + i + 1]
                order = ("peer", "plain") if i % 2 == 0 else ("plain", "peer")
                for name in order:
                    start = time.perf_counter()
                    streams[name](token)
                    if i >= 4:
                        seconds[name] += time.perf_counter() - start
            ratios.append(seconds["plain"] / seconds["peer"])
            peer_ms.append(1000 * seconds["peer"] / steps)
            plain_ms.append(1000 * seconds["plain"] / steps)
    return {"window_length": window_length, "ratio": statistics.median(ratios), "ratios": ratios,
            "peer_ms_per_token": statistics.median(peer_ms), "plain_ms_per_token": statistics.median(plain_ms),
            "steps": steps, "runs": runs}


def chunk_leak(factory: StreamFactory, ids: Any, window_length: int, chunk: int, vocab_size: int = 49152) -> float:
    """How much chunk token 0's logits move when the chunk's later tokens change (0 for a causal stream).

    Two fresh streams are each fed the stream's first ``window_length + chunk`` tokens ``chunk`` per call (so the
    cache is full and has evicted), then one more chunk: the stream's next ``chunk`` tokens in one, the same first
    token followed by other tokens in the other. Token 0 of a chunk must not see the tokens after it.
    """
    import torch

    first = (window_length // chunk + 1) * chunk
    logits = []
    with torch.no_grad():
        for changed in (False, True):
            step = factory()
            for start in range(0, first, chunk):
                step(ids[None, start:start + chunk])
            block = ids[first:first + chunk].clone()
            if changed:
                block[1:] = (block[1:] + 1000) % vocab_size
            logits.append(step(block[None])[0].float())
    return float((logits[0] - logits[1]).abs().max())


def measure(peer: str, args: argparse.Namespace, versions: dict[str, str], load: Callable[[str], Any],
            streams: Callable[[Any, str, int, int], StreamFactory], notes: Sequence[str] = (),
            extra: Callable[[], dict[str, Any]] | None = None) -> int:
    """Run the whole protocol for one peer and write ``args.output``; returns the exit status.

    Args:
        load: ``model_dir -> models``, whatever ``streams`` needs (loaded once).
        streams: ``(models, regime, window_length, num_sink_tokens) -> factory of steps``; regime is ``plain``
            (the venv's plain cache), ``peer`` or ``peer-chunked`` (for the long stream). Raises for a regime the
            peer cannot do; the error is recorded.
        extra: more facts for the JSON (configurations refused, ...), called after loading.
    """
    import torch

    torch.set_num_threads(1)
    inputs = json.loads(args.inputs.read_text())
    ids = torch.tensor(inputs["token_ids"])
    W, s = args.window_length, args.num_sink_tokens
    result: dict[str, Any] = {"peer": peer, "status": "ok", "versions": versions, "notes": list(notes),
                              "machine": {"python": platform.python_version(), "threads": torch.get_num_threads(),
                                          "cpu": platform.processor() or platform.machine()},
                              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "regimes": {}, "errors": {}}
    try:
        models = load(inputs["model_dir"])
        if extra is not None:
            result.update(extra())
    except Exception as error:  # the peer cannot even load: that is its result
        result.update(status="failed", stage="load", error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc(limit=4))
        write_json(args.output, result)
        return 1
    layers = [int(i) for i in args.observe_layers.split(",") if i]
    window_tokens = args.num_tokens if args.window_tokens is None else args.window_tokens
    # the sink regime first after the short dense check: a run cut short keeps what matters most
    plan = [("dense", "plain", args.dense_tokens, 0), ("sink", "peer", args.num_tokens, s),
            ("speed", "", 0, 0), ("long", "", 0, 0), ("window", "peer", window_tokens, 0)]
    for regime, kind, count, sinks in plan:
        if regime == "speed":
            result["speed"] = _speed(args, models, streams, ids, result["errors"])
        elif regime == "long" and args.long_tokens:
            _long(args, models, streams, ids, result)
        write_json(args.output, result)  # after every part: what finished survives an interrupted run
        if count <= 0:
            continue
        print(f"[{peer}] {regime}: {count} tokens", flush=True)
        try:
            step = streams(models, kind, W, sinks)()
            observer = None if regime == "dense" else AttentionObserver(_first_model(models), layers, W, sinks)
            if observer is None:
                nll, seconds = stream_nll(step, ids[: count + 1], label=f"{peer} {regime}")
            else:
                with observer:
                    nll, seconds = stream_nll(step, ids[: count + 1], observer=observer, label=f"{peer} {regime}")
            cached = regime != "dense"
            result["regimes"][regime] = {
                "tokens": count, "perplexity": perplexity(nll), "seconds": seconds,
                "tokens_per_second": count / seconds, "num_sink_tokens": sinks if cached else None,
                "window_length": W if cached else None,
                "running": running(nll), "nll_first_256": nll[:256],
                "attention": None if observer is None else observer.summary()}
        except Exception as error:
            result["errors"][regime] = f"{type(error).__name__}: {error}"
            print(f"[{peer}] {regime} failed: {result['errors'][regime]}", file=sys.stderr, flush=True)
    if result["errors"] and not result["regimes"]:
        result["status"] = "failed"
    write_json(args.output, result)
    print(f"[{peer}] wrote {args.output}", flush=True)
    return 0


def _speed(args: argparse.Namespace, models: Any, streams: Callable[[Any, str, int, int], StreamFactory], ids: Any,
           errors: dict[str, str]) -> list[dict[str, Any]]:
    """``speed_ratio`` at each of ``--speed-windows``; a failure goes into ``errors``."""
    speed: list[dict[str, Any]] = []
    for size in [int(w) for w in args.speed_windows.split(",") if w]:
        print(f"[speed] at a {size}-token cache", flush=True)
        try:
            speed.append(speed_ratio(streams(models, "peer", size, args.num_sink_tokens),
                                     streams(models, "plain", size, 0), ids, size, args.speed_steps, args.speed_runs))
        except Exception as error:
            errors[f"speed-{size}"] = f"{type(error).__name__}: {error}"
    return speed


def _long(args: argparse.Namespace, models: Any, streams: Callable[[Any, str, int, int], StreamFactory], ids: Any,
          result: dict[str, Any]) -> None:
    """The long stream (sink regime, ``--long-chunk`` tokens per call) into ``result["long"]``, after checking that
    the peer's chunks are causal (``chunk_leak``); a failure goes into ``result["errors"]["long"]``."""
    W, s, peer = args.window_length, args.num_sink_tokens, result["peer"]
    print(f"[{peer}] long stream: {args.long_tokens} tokens, {args.long_chunk} per call", flush=True)
    try:
        leak = chunk_leak(streams(models, "peer-chunked", W, s), ids, W, args.long_chunk)
        if leak > 1e-3:
            raise RuntimeError(f"not causal in chunks of {args.long_chunk}: the first token's logits move by "
                               f"{leak:.3g} when the chunk's later tokens change, so chunked perplexity would "
                               "score tokens that saw their successors")
        step = streams(models, "peer-chunked", W, s)()
        nll, seconds = stream_nll(step, ids[: args.long_tokens + 1], chunk=args.long_chunk,
                                  label=f"{peer} long")
        tail = nll[-1000:]
        result["long"] = {"tokens": args.long_tokens, "chunk": args.long_chunk, "perplexity": perplexity(nll),
                          "chunk_leak_max_logit_change": leak,
                          "perplexity_last_1000": perplexity(tail), "seconds": seconds,
                          "perplexity_by_2000": [perplexity(nll[i:i + 2000]) for i in range(0, len(nll), 2000)],
                          "running": running(nll, 128)}
    except Exception as error:
        result["errors"]["long"] = f"{type(error).__name__}: {error}"


def _first_model(models: Any) -> Any:
    """The model whose layers the observer hooks: ``models`` itself or its ``peer`` entry."""
    return models["peer"] if isinstance(models, dict) else models
