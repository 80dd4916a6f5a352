"""Load test of ``python -m sinkcache serve`` (issue 30, item 6): N concurrent clients, each a chat of T turns
through the official ``openai`` client, half of them streamed; loopback only, bounded, stops by itself.

    python benchmarks/serve_load.py --clients 8 --turns 20 --max-tokens 16          # starts the bundled SmolLM2
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME ...    # against a running server

Reports errors, throughput (requests/s, generated tokens/s), latency and time-to-first-token percentiles, the
share of turns that continued their session (``cached_tokens`` > 0 after turn 1) and the server's resident memory
after warm-up (the first quarter of the requests) and at the end. ``tests/test_serve.py`` runs it on a tiny model
and checks every reply against its sequential reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WORDS = ("tell me about rivers mountains caches tokens windows streams memory positions python lists sets "
         "dictionaries loops functions classes the sky a cat").split()


def default_message(client: int, turn: int) -> str:
    """A short, deterministic user turn per client and turn."""
    picks = [WORDS[(client * 7 + turn * 3 + k * 5) % len(WORDS)] for k in range(4 + (client + turn) % 4)]
    return f"Client {client}, turn {turn}: " + " ".join(picks) + "?"


@dataclass
class Turn:
    client: int
    turn: int
    stream: bool
    reply: str = ""
    latency_s: float = 0.0
    ttft_s: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


@dataclass
class LoadResult:
    turns: list[Turn]
    wall_s: float
    rss_samples: list[tuple[int, int]] = field(default_factory=list)  # (requests done, server RSS bytes)

    def replies(self, client: int) -> list[str]:
        return [t.reply for t in sorted(self.turns, key=lambda t: t.turn) if t.client == client]

    def summary(self) -> dict[str, Any]:
        ok = [t for t in self.turns if t.error is None]
        later = [t for t in ok if t.turn > 0]

        def pct(values: list[float], q: float) -> float:
            return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

        latencies, ttfts = [t.latency_s for t in ok], [t.ttft_s for t in ok]
        quarter = len(self.turns) // 4
        warm = [rss for done, rss in self.rss_samples if done >= quarter]
        return {
            "requests": len(self.turns), "errors": len(self.turns) - len(ok), "wall_s": round(self.wall_s, 2),
            "requests_per_s": round(len(ok) / self.wall_s, 2),
            "generated_tokens_per_s": round(sum(t.completion_tokens for t in ok) / self.wall_s, 1),
            **{f"latency_p{q}_s": round(pct(latencies, q), 3) for q in (50, 90, 99)},
            **{f"ttft_p{q}_s": round(pct(ttfts, q), 3) for q in (50, 90, 99)},
            "continued_share": round(sum(t.cached_tokens > 0 for t in later) / max(len(later), 1), 3),
            "rss_after_warmup_mib": round(warm[0] / 2**20, 1) if warm else None,
            "rss_end_mib": round(self.rss_samples[-1][1] / 2**20, 1) if self.rss_samples else None,
            "rss_max_after_warmup_mib": round(max(warm) / 2**20, 1) if warm else None,
        }


def run_load(url: str, model: str, clients: int, turns: int, max_tokens: int, *, api_key: str = "none",
             message: Callable[[int, int], str] = default_message, rss: Callable[[], int] | None = None,
             timeout_s: float = 600) -> LoadResult:
    """``clients`` threads each hold a ``turns``-turn chat (even clients streamed), greedy; returns every turn.

    Bounded: each request times out after ``timeout_s``, and a client stops at its first error."""
    import openai

    done = [0]
    lock = threading.Lock()
    results: list[Turn] = []
    samples: list[tuple[int, int]] = []

    def chat(client: int) -> None:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=timeout_s, max_retries=0)
        messages: list[dict[str, str]] = []
        for turn in range(turns):
            record = Turn(client, turn, stream=client % 2 == 0)
            messages.append({"role": "user", "content": message(client, turn)})
            start = time.perf_counter()
            try:
                ask(api, model, messages, max_tokens, record, start)
            except Exception as error:  # counted and reported; the client stops
                record.error = f"{type(error).__name__}: {error}"
            record.latency_s = time.perf_counter() - start
            with lock:
                results.append(record)
                done[0] += 1
                if rss is not None:
                    samples.append((done[0], rss()))
            if record.error:
                return
            messages.append({"role": "assistant", "content": record.reply})

    start = time.perf_counter()
    threads = [threading.Thread(target=chat, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s * turns)
    return LoadResult(results, time.perf_counter() - start, samples)


def ask(api: Any, model: str, messages: list[dict[str, str]], max_tokens: int, record: Turn, start: float) -> None:
    """One request; fills ``record``'s reply, first-token time and usage."""
    if not record.stream:
        response = api.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
        record.ttft_s = time.perf_counter() - start
        record.reply = response.choices[0].message.content or ""
        usage = response.usage
    else:
        pieces, usage = [], None
        for chunk in api.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                                 stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                if not pieces:
                    record.ttft_s = time.perf_counter() - start
                pieces.append(chunk.choices[0].delta.content)
        record.reply = "".join(pieces)
        record.ttft_s = record.ttft_s or time.perf_counter() - start
    if usage is not None:
        record.completion_tokens, record.prompt_tokens = usage.completion_tokens, usage.prompt_tokens
        details = usage.prompt_tokens_details
        record.cached_tokens = (details.cached_tokens or 0) if details is not None else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start the bundled SmolLM2 on a free "
                        "loopback port)")
    parser.add_argument("--model", default=None, help="the served model id (default: the server's first)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--window-length", type=int, default=256, help="when starting the server")
    parser.add_argument("--threads", type=int, default=2, help="the started server's torch threads")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="KIB", help="the started server's "
                        "--mmap-threshold (default: the server's; 0 leaves glibc's dynamic threshold)")
    parser.add_argument("--out", default=None, help="write the summary as JSON here")
    args = parser.parse_args()

    from sinkcache.serve.launch import Server, serve_command

    options = ["--window-length", str(args.window_length), "--threads", str(args.threads)]
    if args.mmap_threshold is not None:
        options += ["--mmap-threshold", str(args.mmap_threshold)]
    server = None if args.url else Server(serve_command(*options))
    if server is not None:
        server.start()
    try:
        url = args.url or server.url  # type: ignore[union-attr]
        import urllib.request

        with urllib.request.urlopen(f"{url}/v1/models") as response:
            model = args.model or json.loads(response.read())["data"][0]["id"]
        result = run_load(url, model, args.clients, args.turns, args.max_tokens,
                          rss=server.rss_bytes if server else None)
    finally:
        if server is not None:
            server.stop()
    summary = {"clients": args.clients, "turns": args.turns, "max_tokens": args.max_tokens,
               "server": server.command[1:] if server else args.url, **result.summary()}
    print(json.dumps(summary, indent=1))
    for turn in result.turns:
        if turn.error:
            print(f"error: client {turn.client} turn {turn.turn}: {turn.error}")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(summary, file, indent=1)


if __name__ == "__main__":
    main()
