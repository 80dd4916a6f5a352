"""The transformers ``pipeline("text-generation")`` on a streaming-enabled model: nothing else to change.

    python examples/pipeline.py
    python examples/pipeline.py --window 128 --max-new-tokens 16

``enable_streaming`` replaces the model's ``generate``, which the pipeline calls: every call gets a fresh SinkCache,
and prompts longer than the window are prefilled in chunks. Shown: a chat, a prompt longer than the window, and a
batch of two prompts of different lengths (the pipeline pads them on the left, which SinkCache supports).
"""

from __future__ import annotations

import argparse
import time

from _common import add_model_arguments, load
from transformers import pipeline

from sinkcache import enable_streaming, offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, window=256)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    model, tokenizer = load(args)
    enable_streaming(model, args.window, args.sinks)
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left (SinkCache refuses right padding)
    if tokenizer.pad_token is None:  # the pipeline pads batches itself only on transformers 5.x releases after 5.0
        tokenizer.pad_token = tokenizer.eos_token
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_full_text=False)

    chat = [{"role": "user", "content": "What is an attention sink in a language model? Answer briefly."}]
    manual = offline.default_text()[: 16 * args.window]  # about 4 characters a token: ~4 windows long
    manual_tokens = len(tokenizer(manual).input_ids)
    long_prompt = f"{manual}\n\nIn one sentence, the text above is about"
    batch = ["The capital of France is", "Here is a short poem about the sea:\n"]
    for name, inputs, extra in (
        ("chat", chat, {}),
        (f"long prompt ({manual_tokens:,} tokens, window {args.window})", long_prompt, {}),
        ("batch of 2, left-padded", batch, {"batch_size": 2}),
    ):
        start = time.perf_counter()
        results = generator(inputs, **options, **extra)
        seconds = time.perf_counter() - start
        # One input gives [{"generated_text": ...}], a list of inputs one such list per input.
        texts = [row[0]["generated_text"] for row in (results if isinstance(results[0], list) else [results])]
        generated = sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts)
        print(f"\n[pipeline] {name}: {seconds:.1f} s, about {generated / seconds:.1f} generated tokens/s")
        for text in texts:
            print(f"  -> {text.strip()!r}")
    print("\n[done] pipeline calls=3")


if __name__ == "__main__":
    main()
