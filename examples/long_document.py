"""Read a document far longer than the model's context through the cache, then continue it with ``generate``.

    python examples/long_document.py                       # all of CPython's docs: ~113,000 tokens (8,192 context)
    python examples/long_document.py --tokens 3000 --window 256 --report-every 1000

The document is fed in chunks of ``--chunk`` tokens; each chunk attends to the sinks, the window and itself.
Every ``--report-every`` tokens the script prints the perplexity of the tokens since the last report (how well the
model predicts each next token of the document), the speed and the memory: the perplexity stays at the level of a
short text long after the model's context length has been passed, and memory stays flat. Then ``generate``
continues the document from the same cache.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _common import add_model_arguments, load, memory_line

from sinkcache import CACHE_KWARG, SinkCache, enable_streaming, offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=0, help="read only the first N tokens (0: the whole text)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per forward call")
    parser.add_argument("--report-every", type=int, default=8192, help="report every N tokens read")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the continuation")
    args = parser.parse_args()

    model, tokenizer = load(args)
    enable_streaming(model, args.window, args.sinks)
    ids = tokenizer(offline.default_text(), return_tensors="pt").input_ids
    if args.tokens:
        ids = ids[:, : args.tokens]
    print(f"document: {ids.shape[1]:,} tokens; the model's context is {model.config.max_position_embeddings:,}")

    cache = SinkCache(args.window, args.sinks)
    # All but the last token: generate() feeds the ids the cache has not seen, so it needs at least one.
    document = ids[:, :-1]
    nll, counted, start = 0.0, 0, time.perf_counter()
    previous = None  # logits of the last token of the previous chunk: they predict this chunk's first token
    with torch.no_grad():
        for begin in range(0, document.shape[1], args.chunk):
            chunk = document[:, begin : begin + args.chunk]
            logits = model(input_ids=chunk, **{CACHE_KWARG: cache}).logits[0].float()
            predicting = logits[:-1] if previous is None else torch.cat([previous, logits[:-1]])
            targets = chunk[0, 1:] if previous is None else chunk[0]
            nll += torch.nn.functional.cross_entropy(predicting, targets, reduction="sum").item()
            counted += len(targets)
            previous = logits[-1:]
            read = begin + chunk.shape[1]
            if read // args.report_every != begin // args.report_every or read == document.shape[1]:
                seconds = time.perf_counter() - start
                print(f"[read] tokens={read} perplexity={math.exp(nll / counted):.2f} "
                      f"tokens_per_s={read / seconds:.0f} {memory_line(cache)}", flush=True)
                nll, counted = 0.0, 0

    start = time.perf_counter()
    output = model.generate(input_ids=ids, cache=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
    new = output[0, ids.shape[1]:]
    seconds = time.perf_counter() - start
    print(f"[continuation] generated={len(new)} tokens_per_s={len(new) / seconds:.1f} {memory_line(cache)}")
    print(f"--- the document ends with ---\n{tokenizer.decode(ids[0, -40:])}")
    print(f"--- the model continues ---\n{tokenizer.decode(new, skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
