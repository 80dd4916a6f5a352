"""A terminal chat against ``python -m sinkcache serve`` with the official ``openai`` client.

    python -m sinkcache serve &                                  # the bundled SmolLM2 on http://127.0.0.1:8000
    python examples/chat_client.py                               # type a message, Enter; Ctrl-D or /quit to leave
    python examples/chat_client.py --turns 5                     # scripted: 5 built-in turns

Replies stream token by token. The client sends the whole conversation every turn, as any OpenAI client does; the
server recognises it and feeds only the new tokens into the conversation's SinkCache, which each turn's
``[usage]`` line shows (``cached`` prompt tokens were not fed again). Send replies back exactly as received: an
edited reply starts a new session (correct, but prefilled in full).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator

import openai

SCRIPT = ["Hi! Who are you?", "Give me one tip for writing readable Python.", "What is a list comprehension?",
          "Name three rivers in Europe.", "Thanks, that is all for now."]


def read_stdin() -> Iterator[str]:
    """User messages from stdin, one per line, until end of input or /quit."""
    for line in sys.stdin:
        if line.strip() == "/quit":
            return
        if line.strip():
            yield line.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--model", default=None, help="the served model id (default: the server's only one)")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    parser.add_argument("--system", default=None, help="a system message to start the conversation with")
    parser.add_argument("--max-tokens", type=int, default=128, help="longest reply, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (reproducible)")
    parser.add_argument("--turns", type=int, default=0, help="scripted mode: this many built-in turns (0: stdin)")
    args = parser.parse_args()

    api = openai.OpenAI(base_url=f"{args.url.rstrip('/')}/v1", api_key=args.api_key, max_retries=0)
    try:
        model = args.model or api.models.list().data[0].id
    except openai.APIError as error:
        sys.exit(f"chat_client: cannot reach the server at {args.url}: {error}. Start it with python -m sinkcache "
                 "serve, or pass --url (and --api-key if it has one).")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    scripted = args.turns > 0
    turns = itertools.islice(itertools.cycle(SCRIPT), args.turns) if scripted else read_stdin()
    if not scripted:
        print(f"Chatting with {model} at {args.url} (Ctrl-D or /quit to leave).", flush=True)
    for number, text in enumerate(turns, start=1):
        if scripted:
            print(f"you: {text}")
        messages.append({"role": "user", "content": text})
        print("assistant: ", end="", flush=True)
        start, pieces, usage = time.perf_counter(), [], None
        for chunk in api.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                                 temperature=args.temperature, stream=True,
                                                 stream_options={"include_usage": True}):
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                print(pieces[-1], end="", flush=True)
        reply = "".join(pieces)  # sent back verbatim next turn, so that the server continues its session
        messages.append({"role": "assistant", "content": reply})
        seconds = time.perf_counter() - start
        if usage is not None:
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            print(f"\n[usage] turn={number} prompt={usage.prompt_tokens} cached={cached} "
                  f"generated={usage.completion_tokens} seconds={seconds:.2f}", flush=True)


if __name__ == "__main__":
    main()
