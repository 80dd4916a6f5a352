"""A long chat against three OpenAI-compatible servers of the same model (issue 30, item 7), offline:

* ``sessions``: ``python -m sinkcache serve`` (each turn continues the conversation's SinkCache);
* ``no-sessions``: the same with ``--no-sessions`` (every request prefilled in full, through a SinkCache);
* ``transformers``: ``transformers serve`` on the same GGUF file (its own cache, rebuilt every request).

    python benchmarks/serve.py                       # 100 turns, 16-token replies, bundled SmolLM2, docs/serve/
    python benchmarks/serve.py --quick --out DIR     # a tiny random model, 6 turns, two servers (the test)

One client, streamed, greedy; the user turns are sentences of the bundled text (CPython's docs). Per turn it
records the time to the first token, the total time, the prompt tokens the server fed (``prompt_tokens -
cached_tokens``) and the server's memory after the turn: the PSS of its process and of those it started
(transformers serve runs its model in a child). Writes ``results.json`` and ``serve.png``. Servers listen on
127.0.0.1 only and are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sinkcache import machine, offline
from sinkcache.serve.launch import Server, serve_command

SERVERS = ("sessions", "no-sessions", "transformers")


def user_turns(count: int, words: int = 18) -> list[str]:
    """``count`` user turns: sentences of the bundled text, cut to ``words`` words, spread over the text."""
    sentences = [s.strip() for s in re.split(r"(?<=[.?!])\s+", offline.default_text()) if len(s.split()) >= 6]
    step = max(len(sentences) // count, 1)
    return [" ".join(sentences[i * step].split()[:words]) for i in range(count)]


def command(kind: str, args: argparse.Namespace, port: int) -> tuple[list[str], str | None]:
    """The server's command line, and its URL when it does not print sinkcache's start line."""
    model = ["--model", args.model] + (["--gguf-file", args.gguf_file] if args.gguf_file else [])
    common = [*model, "--window-length", str(args.window_length), "--threads", str(args.threads)]
    if kind == "sessions":
        return serve_command(*common), None
    if kind == "no-sessions":
        return serve_command(*common, "--no-sessions"), None
    gguf = offline.smollm2_gguf() if args.model == offline.DEFAULT_MODEL else None
    target = f"{gguf.parent}:{gguf.name}" if gguf else args.model
    exe = Path(sys.executable).with_name("transformers")
    # float32, the dtype sinkcache's loader de-quantises GGUF weights to, stated so that both servers run the same
    # arithmetic whatever ``auto`` resolves to in a given release (float32 for this file in 5.25)
    return [str(exe), "serve", target, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            "--dtype", "float32"], f"http://127.0.0.1:{port}"


def run_chat(server: Server, model: str, turns: list[str], max_tokens: int, timeout_s: float) -> list[dict[str, Any]]:
    """One streamed, greedy chat of ``len(turns)`` turns; a row of measurements per turn."""
    import openai

    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=timeout_s)
    messages: list[dict[str, str]] = []
    rows = []
    for number, text in enumerate(turns, start=1):
        messages.append({"role": "user", "content": text})
        start = time.perf_counter()
        first, pieces, usage = None, [], None
        for chunk in api.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                                 stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                pieces.append(chunk.choices[0].delta.content)
        total = time.perf_counter() - start
        reply = "".join(pieces)
        prompt = usage.prompt_tokens if usage else None
        details = usage.prompt_tokens_details if usage else None
        cached = (details.cached_tokens or 0) if details is not None else 0
        rows.append({"turn": number, "ttft_s": round((first or time.perf_counter()) - start, 4),
                     "total_s": round(total, 4), "prompt_tokens": prompt, "cached_tokens": cached,
                     "fed_tokens": None if prompt is None else prompt - cached,
                     "completion_tokens": usage.completion_tokens if usage else None,
                     "memory_mib": round(server.tree_pss_bytes() / 2**20, 1)})
        messages.append({"role": "assistant", "content": reply})
        print(f"turn {number}: ttft {rows[-1]['ttft_s']:.3f} s, total {total:.2f} s, fed {rows[-1]['fed_tokens']} "
              f"of {prompt}, memory {rows[-1]['memory_mib']} MiB", flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the first and the last tenth of the turns, and the hit rate (turns after the first that
    continued a session)."""
    tenth = max(len(rows) // 10, 1)
    head, tail = rows[:tenth], rows[-tenth:]

    def median(part: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in part if r[key] is not None]
        return round(statistics.median(values), 4) if values else None

    out: dict[str, Any] = {"turns": len(rows), "wall_s": round(sum(r["total_s"] for r in rows), 1)}
    for key in ("ttft_s", "total_s", "fed_tokens", "memory_mib"):
        out[f"{key}_first_tenth"], out[f"{key}_last_tenth"] = median(head, key), median(tail, key)
    out["continued_share"] = round(sum(r["cached_tokens"] > 0 for r in rows[1:]) / max(len(rows) - 1, 1), 3)
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ttft_s", "time to first token (s)"), ("fed_tokens", "prompt tokens fed"),
              ("memory_mib", "server memory (PSS of its processes, MiB)")]
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    for axis, (key, label) in zip(axes, panels):
        for kind, run in results["runs"].items():
            rows = [r for r in run["per_turn"] if r[key] is not None]
            axis.plot([r["turn"] for r in rows], [r[key] for r in rows], label=kind, lw=1.4)
        axis.set_xlabel("turn")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"{results['turns']}-turn chat, {results['model']}, replies of up to {results['max_tokens']} "
                    f"tokens, window {results['window_length']}: per turn")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=offline.DEFAULT_MODEL)
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--window-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="each server's torch threads")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}")
    parser.add_argument("--port", type=int, default=8517, help="transformers serve's port (it cannot pick one)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a request may take")
    parser.add_argument("--out", default="docs/serve")
    parser.add_argument("--quick", action="store_true", help="a tiny random model saved to --out, 6 turns, "
                        "sinkcache's two servers (what tests/test_serve_bench.py runs)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in args.servers.split(",") if k]
    if any(k not in SERVERS for k in kinds):
        parser.error(f"--servers takes {', '.join(SERVERS)}")
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.serving import build_tiny_chat_model

        args.model = str(build_tiny_chat_model(out / "tiny_model").resolve())
        args.turns, args.max_tokens, args.window_length, kinds = 6, 4, 32, ["sessions", "no-sessions"]
    turns = user_turns(args.turns)
    results: dict[str, Any] = {"model": args.model if not args.gguf_file else args.gguf_file, "turns": args.turns,
                               "max_tokens": args.max_tokens, "window_length": args.window_length,
                               "machine": machine.describe(torch.device("cpu"), args.threads), "runs": {}}
    for kind in kinds:
        argv_, url = command(kind, args, args.port)
        print(f"== {kind}: {' '.join(argv_)}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # transformers serve has no threads option
        with Server(argv_, url=url, health="/v1/models" if url else "/health", timeout_s=args.timeout,
                    env=env) as server:
            model = server.get("/v1/models")["data"][0]["id"]
            rows = run_chat(server, model, turns, args.max_tokens, args.timeout)
        results["runs"][kind] = {"command": argv_, "summary": summarize(rows), "per_turn": rows}
        print(json.dumps(results["runs"][kind]["summary"]), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))  # after each server: partial runs count
    plot(results, out / "serve.png")
    print(f"wrote {out / 'results.json'} and {out / 'serve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
