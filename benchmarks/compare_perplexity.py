"""Compare two results.json files of the perplexity benchmark regime by regime: did a change move perplexity?

Run from the repository root, e.g. after a change to the storage core::

    python -m sinkcache perplexity ... --output /tmp/after       # the command recorded next to the "before" file
    python benchmarks/compare_perplexity.py docs/memory/gemma3_before/w128/results.json /tmp/after/results.json

Prints, per regime both files have, the perplexity before and after and their relative difference (also per
segment, the largest), and exits 1 when any exceeds ``--rtol`` (default 1e-4: float32 summation-order noise moves a
1,000-token perplexity by far less; a real change of what the model sees moves it by percents), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def regimes(path: Path, parser: OneLineErrors) -> dict[str, Any]:
    """The ``regimes`` of a perplexity results file."""
    try:
        found = json.loads(path.read_text())["regimes"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(f"{path} is not a perplexity results.json ({type(error).__name__}: {error})")
    return found


def main(argv: Iterable[str] | None = None) -> int:
    parser = OneLineErrors(prog="compare_perplexity.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-4, help="largest relative difference allowed")
    args = parser.parse_args(argv)
    before, after = regimes(args.before, parser), regimes(args.after, parser)
    common = [name for name in before if name in after]
    if not common:
        parser.error(f"no regime in both files ({sorted(before)} / {sorted(after)})")
    worst = 0.0
    print("| regime | before | after | relative difference | largest, per segment |")
    print("|---|---:|---:|---:|---:|")
    for name in common:
        b, a = before[name], after[name]
        if b["tokens_scored"] != a["tokens_scored"]:
            parser.error(f"{name}: {b['tokens_scored']} tokens scored before, {a['tokens_scored']} after")
        total = abs(a["perplexity"] - b["perplexity"]) / b["perplexity"]
        segments = max((abs(sa["perplexity"] - sb["perplexity"]) / sb["perplexity"]
                        for sb, sa in zip(b.get("segments", []), a.get("segments", []))), default=0.0)
        worst = max(worst, total, segments)
        print(f"| {name} | {b['perplexity']:.6f} | {a['perplexity']:.6f} | {total:.2e} | {segments:.2e} |")
    moved = worst > args.rtol
    print(f"largest relative difference {worst:.2e}: {'MOVED beyond' if moved else 'within'} --rtol {args.rtol:g}")
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())
