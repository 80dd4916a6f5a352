"""``python -m sinkcache serve``: an OpenAI-compatible chat server whose conversations continue on their own
SinkCache (``pip install "sinkcache[serve]"``).

Modules: ``protocol`` (the wire format), ``sessions`` (kept conversations), ``engine`` (generation and its queue),
``app`` (the FastAPI routes). ``docs/serve.md`` describes the server and its measurements.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = ("An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health) whose "
               "conversations continue on their own SinkCache: each turn feeds only its new tokens.")


class ServeError(Exception):
    """Bad command-line input or setup; printed as one line, exit status 2."""


def build_parser(prog: str = "python -m sinkcache serve") -> argparse.ArgumentParser:
    from ..cli import parser

    p = parser(prog, DESCRIPTION, ServeError)
    p.add_argument("--window-length", type=int, default=1024, help="tokens each conversation's cache keeps, sinks "
                   "included")
    p.add_argument("--num-sink-tokens", type=int, default=4, help="first tokens of each conversation kept forever")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, printed)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 request")
    p.add_argument("--session-memory", type=float, default=1024.0, help="MiB the kept conversations may hold "
                   "together (SinkCache.nbytes plus their token ids); the least recently used are evicted beyond it")
    p.add_argument("--no-sessions", action="store_true", help="keep no conversation: prefill every request in full "
                   "(the baseline of benchmarks/serve.py)")
    p.add_argument("--served-model-name", default=None, help="the model id clients pass (default: from --model or "
                   "the GGUF file's name)")
    p.add_argument("--max-tokens", type=int, default=512, help="reply length when a request gives no max_tokens")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait; more get 503")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--mmap-threshold", type=int, default=64, metavar="KIB", help="on glibc, serve blocks of this "
                   "many KiB or more (up to 32768) with their own mmap, which keeps the server's memory flat over "
                   "hours (0: leave glibc's dynamic threshold; a threshold set in the environment, "
                   "MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES, takes precedence)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def model_name(model: str, gguf_file: str | None) -> str:
    """The default id of the served model: the GGUF file's stem, else the last part of ``--model``."""
    from .. import offline

    if gguf_file or model == offline.DEFAULT_MODEL:
        return Path(gguf_file or offline.smollm2_gguf().name).name.removesuffix(".gguf")
    return Path(model.rstrip("/")).name or model


def main(argv: Sequence[str] | None = None, prog: str = "python -m sinkcache serve") -> int:
    """Run the server until interrupted; returns the exit status (2 with one line on stderr for bad input, naming
    ``prog``)."""
    try:
        args = build_parser(prog).parse_args(argv)
        for name in ("window_length", "max_tokens", "max_tokens_limit", "max_queue"):
            if getattr(args, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
        for name in ("session_memory", "mmap_threshold"):
            if getattr(args, name) < 0:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}.")
        from .. import machine

        if args.mmap_threshold * 1024 > machine.MAX_MMAP_THRESHOLD:
            raise ServeError(f"--mmap-threshold must be at most {machine.MAX_MMAP_THRESHOLD >> 10} KiB, got "
                             f"{args.mmap_threshold}.")
        if not 0 <= args.port < 65536:
            raise ServeError(f"--port must be between 0 and 65535, got {args.port}.")
        if args.max_tokens > args.max_tokens_limit:
            raise ServeError(f"--max-tokens ({args.max_tokens}) must not exceed --max-tokens-limit "
                             f"({args.max_tokens_limit}).")
        try:
            import fastapi  # noqa: F401
            import uvicorn
        except ImportError as error:
            raise ServeError(f"The server needs {error.name}: pip install \"fastapi>=0.110\" \"uvicorn>=0.29\" "
                             "(the serve extra).") from None
        fix_allocator(args.mmap_threshold)
        return serve(args, uvicorn)
    except ServeError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


def fix_allocator(threshold_kib: int) -> None:
    """Fix glibc's mmap threshold at ``threshold_kib`` (0: leave it dynamic) unless the environment already set one.

    Each prompt is prefilled as a chunk, for which a cache briefly holds window + chunk slots; with glibc's dynamic
    threshold those varying blocks end up in a heap that fragments, and the server's memory drifts up
    (docs/serve.md measures it)."""
    from .. import machine

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not threshold_kib or "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in tunables:
        return
    if not machine.fix_mmap_threshold(threshold_kib * 1024) and machine.is_glibc():
        logging.getLogger(__name__).warning("glibc refused an mmap threshold of %d KiB; left dynamic", threshold_kib)


def serve(args: argparse.Namespace, uvicorn) -> int:  # type: ignore[no-untyped-def]
    import torch

    from .. import offline
    from ..patch import enable_streaming
    from ..rotary import UnsupportedModelError
    from ..selfcheck import SelfCheckError
    from .app import create_app
    from .engine import Engine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    # bind first, so that a busy port fails before the model loads, and --port 0 can print the port it got
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        raise ServeError(f"Cannot listen on {args.host}:{args.port}: {error.strerror}.") from None
    try:
        model, tokenizer = offline.load_model(args.model, args.gguf_file)
        enable_streaming(model, args.window_length, args.num_sink_tokens)
    except (offline.SetupError, ValueError, SelfCheckError, UnsupportedModelError) as error:
        sock.close()
        raise ServeError(str(error)) from None
    name = args.served_model_name or model_name(args.model, args.gguf_file)
    engine = Engine(model, tokenizer, args.window_length, args.num_sink_tokens,
                    session_budget_bytes=int(args.session_memory * 2**20), sessions=not args.no_sessions,
                    max_queue=args.max_queue)
    app = create_app(engine, name, api_key=args.api_key, default_max_tokens=args.max_tokens,
                     max_tokens_limit=args.max_tokens_limit)
    host, port = sock.getsockname()[:2]
    print(f"sinkcache serve: {name} (window {args.window_length}, {args.num_sink_tokens} sinks, sessions "
          f"{'off' if args.no_sessions else f'{args.session_memory:g} MiB'}) on http://{host}:{port}/v1", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    return 0
