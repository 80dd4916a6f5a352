"""Generate 100,000 tokens in one ``generate`` call, far past the model's context, printed as they come.

    python examples/endless_generation.py                      # 100,000 tokens; text on stdout, stats on stderr
    python examples/endless_generation.py --tokens 300 --window 64 --report-every 100

The text streams to stdout; every ``--report-every`` tokens a line with tokens/s, the cache's size and the
process memory goes to stderr. Both stay flat: the cache holds the first ``--sinks`` tokens and the last
``--window`` ones, whatever the number of tokens generated. (The id tensor that ``generate`` returns still grows by
8 bytes a token.) Past 8,192 tokens transformers prints a "friendly reminder" that the model's maximum length has
been exceeded: with a SinkCache the model never sees a position beyond the window, so it can be ignored.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import add_model_arguments, load, memory_line
from transformers import TextStreamer

from sinkcache import SinkCache, enable_streaming

PROMPT = "Tell me a very long story about a lighthouse keeper and the sea. Never stop."


class ReportingStreamer(TextStreamer):
    """Prints the text as it is decoded, and a speed and memory line every ``every`` generated tokens."""

    def __init__(self, tokenizer, cache: SinkCache, every: int):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.cache, self.every = cache, every
        self.generated = 0
        self.start = self.last_time = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:  # the first call carries the prompt, which is not generated
            self.generated += value.numel()
            if self.generated % self.every == 0:
                now = time.perf_counter()
                print(f"\n[stats] generated={self.generated} tokens_per_s={self.every / (now - self.last_time):.1f} "
                      f"{memory_line(self.cache)}", file=sys.stderr, flush=True)
                self.last_time = now
        super().put(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens to generate")
    parser.add_argument("--report-every", type=int, default=1000, help="stats line every N tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = load(args)
    enable_streaming(model, args.window, args.sinks)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    cache = SinkCache(args.window, args.sinks)
    streamer = ReportingStreamer(tokenizer, cache, args.report_every)
    torch.manual_seed(args.seed)
    # Sampling, because greedy decoding of a small model soon loops; min_new_tokens keeps it from ever stopping.
    output = model.generate(**prompt, cache=cache, streamer=streamer, max_new_tokens=args.tokens,
                            min_new_tokens=args.tokens, do_sample=True, temperature=0.8, top_p=0.95)
    seconds = time.perf_counter() - streamer.start
    generated = output.shape[1] - prompt["input_ids"].shape[1]
    print(f"\n[done] generated={generated} seconds={seconds:.1f} tokens_per_s={generated / seconds:.1f} "
          f"{memory_line(cache)}", file=sys.stderr)


if __name__ == "__main__":
    main()
