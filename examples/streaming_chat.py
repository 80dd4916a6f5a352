"""Multi-turn chat with ONE persistent SinkCache, through the model's chat template, at constant memory.

    python examples/streaming_chat.py                     # interactive: one message per line, Ctrl-D to quit
    python examples/streaming_chat.py --turns 300         # scripted: 300 turns, memory reported every 10 turns

Each turn feeds only the new tokens (the closing of the previous reply, the user's message and the assistant
header) into the same cache, which keeps the first ``--sinks`` tokens of the conversation (the system prompt's
start) and the most recent ``--window`` tokens. The conversation can go on forever; the model's context (8,192
tokens for SmolLM2) and memory never run out. What it cannot do is remember what left the window.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator

import torch
from _common import add_model_arguments, load, memory_line
from transformers import TextStreamer

from sinkcache import SinkCache, enable_streaming

SCRIPT = [
    "Hi! Who are you?",
    "Give me one tip for writing readable Python.",
    "What is a list comprehension?",
    "Name three rivers in Europe.",
    "Why is the sky blue? One sentence, please.",
    "Suggest a name for a grey cat.",
    "What is 12 times 12?",
    "Write a haiku about autumn.",
    "What did I ask you first?",
    "Thanks, that is all for now.",
]


class Chat:
    """A conversation held in one SinkCache.

    ``generate`` with a persistent cache expects the FULL conversation's ids, not just the new turn: like with a
    DynamicCache it skips the first ``cache.get_seq_length()`` ids (everything the cache has already seen, even
    evicted tokens) and feeds the rest. So ``ids`` keeps every token the model has seen or produced. That history
    (and the messages' text) costs a few bytes a token; the keys and values, 45 KiB a token for SmolLM2-135M, stay
    bounded by the window.
    """

    def __init__(self, model, tokenizer, cache: SinkCache, max_new_tokens: int):
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.max_new_tokens = max_new_tokens
        self.messages: list[dict[str, str]] = []
        self.ids = torch.empty(1, 0, dtype=torch.long)
        self.text = ""  # the template text that ``ids`` spell out
        eos = model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])

    def ask(self, message: str, streamer: TextStreamer | None = None) -> tuple[str, int]:
        """Answer ``message``; returns the reply and how many tokens were generated."""
        self.messages.append({"role": "user", "content": message})
        # The template renders the whole conversation; the new turn is what it adds after the text already fed.
        # Rendering the delta as text (instead of re-tokenizing the conversation) keeps the ids of earlier replies
        # exactly as generated, which re-tokenizing decoded text would not guarantee.
        full = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        if not full.startswith(self.text):
            raise RuntimeError("The chat template does not render earlier turns verbatim; this example needs it.")
        new = self.tokenizer(full[len(self.text):], add_special_tokens=False, return_tensors="pt").input_ids
        prompt = torch.cat([self.ids, new], dim=1)
        output = self.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), cache=self.cache,
                                     max_new_tokens=self.max_new_tokens, do_sample=False, streamer=streamer)
        reply_ids = output[0, prompt.shape[1]:]
        generated = len(reply_ids)
        # The end-of-turn token closes the reply in the template; drop it here, the next delta starts with it.
        # (generate never fed it to the cache, so the cache and ``ids`` stay aligned either way.)
        if generated and int(reply_ids[-1]) in self.stop_ids:
            reply_ids = reply_ids[:-1]
        reply = self.tokenizer.decode(reply_ids)
        self.ids = torch.cat([prompt, reply_ids[None]], dim=1)
        self.text = full + reply
        self.messages.append({"role": "assistant", "content": reply})
        return reply.strip(), generated


def read_stdin() -> Iterator[str]:
    """User messages from stdin, one per line, until end of input or /quit."""
    for line in sys.stdin:
        if line.strip() == "/quit":
            return
        if line.strip():
            yield line.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--turns", type=int, default=0,
                        help="scripted mode: this many turns from a built-in script (0: interactive, from stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest reply, in tokens")
    parser.add_argument("--report-every", type=int, default=10, help="memory report every N turns")
    args = parser.parse_args()

    model, tokenizer = load(args)
    enable_streaming(model, args.window, args.sinks)
    chat = Chat(model, tokenizer, SinkCache(args.window, args.sinks), args.max_new_tokens)
    scripted = args.turns > 0
    messages = itertools.islice(itertools.cycle(SCRIPT), args.turns) if scripted else read_stdin()
    if not scripted:
        print("Type a message and press Enter (Ctrl-D or /quit to leave).", flush=True)
    # Interactive replies appear token by token; scripted ones are printed whole after their timing.
    streamer = None if scripted else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    turn, total_tokens, total_seconds = 0, 0, 0.0
    for turn, message in enumerate(messages, start=1):
        print(f"\n[turn {turn}] user: {message}", flush=True)
        if streamer:
            print("assistant: ", end="", flush=True)
        start = time.perf_counter()
        reply, generated = chat.ask(message, streamer)
        seconds = time.perf_counter() - start
        total_tokens, total_seconds = total_tokens + generated, total_seconds + seconds
        if not streamer:
            print(f"assistant: {reply}")
        print(f"[speed] turn={turn} generated={generated} tokens_per_s={generated / seconds:.1f}", flush=True)
        if turn % args.report_every == 0:
            print(f"{memory_line(chat.cache)} turn={turn}", flush=True)
    if turn:
        print(f"\n[done] turns={turn} generated={total_tokens} tokens_per_s={total_tokens / total_seconds:.1f} "
              f"{memory_line(chat.cache)}")


if __name__ == "__main__":
    main()
