"""Shared test settings: one CPU thread, and a report of the worst logit differences seen.

With ``SINKCACHE_MATRIX=file.json`` the per-case worst differences are also written to that file, from which
``scripts/support_matrix.py`` renders the README's table of supported models.
"""

import json
import os

import torch

torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to oversubscription


def pytest_terminal_summary(terminalreporter):
    from tests.test_positions import WORST

    if WORST:
        terminalreporter.section("sinkcache: worst |logit difference| against the oracle (float32)")
        for name, worst in sorted(WORST.items()):
            terminalreporter.write_line(f"{name:32s} {worst:.2e}")
        terminalreporter.write_line(f"{'overall':32s} {max(WORST.values()):.2e}")
    if os.environ.get("SINKCACHE_MATRIX"):
        failed = [report.nodeid for report in terminalreporter.stats.get("failed", [])]
        with open(os.environ["SINKCACHE_MATRIX"], "w") as file:
            json.dump({"worst": WORST, "failed": failed}, file, indent=1)
