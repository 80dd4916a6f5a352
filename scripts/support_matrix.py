"""Run the oracle test matrix and write its results into docs/models.md as the table of supported models.

    python scripts/support_matrix.py          # runs tests/test_positions.py (about a minute), rewrites docs/models.md

The table is generated from what the tests measured, never typed by hand: one row per architecture of
``tests/zoo.py``, one column per attention implementation and batch layout, each cell the worst absolute
next-token logit difference against the oracle (float32), or why the case was not run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.zoo import ARCHITECTURES  # noqa: E402

START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
COLUMNS = [("sdpa", "b1", "sdpa, batch 1"), ("sdpa", "b2", "sdpa, batch 2 left-padded"),
           ("eager", "b1", "eager, batch 1"), ("eager", "b2", "eager, batch 2 left-padded")]


def run_matrix() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "matrix.json"
        env = {**os.environ, "SINKCACHE_MATRIX": str(out)}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_positions.py"], cwd=ROOT, env=env,
                       check=False)
        return json.loads(out.read_text())


def render(results: dict) -> str:
    worst, failed = results["worst"], results["failed"]
    lines = ["| architecture (model_type, RoPE) | " + " | ".join(c[2] for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, (model_type, overrides) in ARCHITECTURES.items():
        params = overrides.get("rope_parameters") or {}
        rope, extras = params.get("rope_type", "default"), []
        if "partial_rotary_factor" in params:
            extras.append(f"partial rotary {params['partial_rotary_factor']}")
        if "sliding_window" in overrides:
            extras.append(f"sliding window {overrides['sliding_window']}")
        label = f"{name} (`{model_type}`, {rope}{''.join(', ' + e for e in extras)})"
        cells = []
        for attn, batch, _ in COLUMNS:
            key = f"{name}/{attn}/{batch}"
            if any(f"[{name}-{attn}]" in node for node in failed):
                cells.append("**fails**")
            elif key in worst:
                cells.append(f"✓ {worst[key]:.0e}")
            else:
                cells.append(f"n/a (no {attn} in transformers)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    table = render(run_matrix())
    page = ROOT / "docs" / "models.md"
    text = page.read_text()
    if START not in text or END not in text:
        sys.exit(f"docs/models.md lacks the markers {START} ... {END}")
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{table}\n{END}", text, flags=re.S)
    page.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
