"""``sinkcache COMMAND [options]`` (also ``python -m sinkcache COMMAND``): the library's commands.

* ``sinks``: measure a model's attention sinks (``sinkcache.sinks``);
* ``perplexity``: the perplexity benchmark (``sinkcache.perplexity``, also ``benchmarks/perplexity.py``);
* ``recall``: a recall probe, planted passcodes asked for inside and beyond the window (``sinkcache.recall``);
* ``doctor``: versions, and whether this install streams exactly (``sinkcache.doctor``: the self-check on a model);
* ``serve``: an OpenAI-compatible chat server, one SinkCache per conversation (``sinkcache.serve``).

``sinkcache COMMAND --help`` lists a command's options. Exit status 2 with one line on stderr for bad
input, as each command does.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

#: command -> what it does; each is the module ``sinkcache.<command>``, whose ``main(argv, prog)`` runs it
COMMANDS = {
    "sinks": "measure a model's attention sinks",
    "perplexity": "the perplexity benchmark",
    "recall": "a recall probe: planted passcodes asked for at growing distances",
    "doctor": "versions, and the self-check: does this install stream exactly?",
    "serve": "an OpenAI-compatible chat server, one SinkCache per conversation",
}


def invoked_as() -> str:
    """How the user ran the commands: the ``sinkcache`` console script, or ``python -m sinkcache``."""
    return "sinkcache" if Path(sys.argv[0]).name == "sinkcache" else "python -m sinkcache"


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a command's ``main``; returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        listing = "; ".join(f"{name}: {what}" for name, what in COMMANDS.items())
        print(f"usage: {invoked_as()} {{{','.join(COMMANDS)}}} [options] ({listing})")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in COMMANDS:  # imported on demand: each command pulls in what it alone needs
        module = importlib.import_module(f".{command}", __package__)
        return module.main(rest, prog=f"{invoked_as()} {command}")
    print(f"sinkcache: error: unknown command {command!r}; choose from {', '.join(COMMANDS)} (see --help).",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
