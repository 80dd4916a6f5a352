"""The guard's cost (issue 30, item 1): ``TokenLedger.record`` per decode step and per prefill chunk, and
``require_prefix`` per turn on a long conversation; medians on the machine at hand.

    python benchmarks/guard_cost.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from sinkcache.ledger import TokenLedger

CONVERSATION = 4851  # tokens: the 100th turn of benchmarks/serve.py's chat


def median_s(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ids = torch.randint(0, 49152, (1, CONVERSATION), generator=torch.Generator().manual_seed(0))
    ledger = TokenLedger()
    ledger.record(ids[:, :-1], None, 1, CONVERSATION - 1)  # a turn's prompt: what was consumed, then a new token
    check = median_s(lambda: ledger.require_prefix(ids), 200)
    print(f"require_prefix on a {CONVERSATION}-token conversation (once per turn): {check * 1e3:.3f} ms")
    one = ids[:, :1]
    step = median_s(lambda: ledger.record(one, None, 1, 1), 5000)
    print(f"record, one-token decode step: {step * 1e6:.2f} us")
    chunk = ids[:, :256]
    prefill = median_s(lambda: TokenLedger().record(chunk, None, 1, 256), 500)
    print(f"record, 256-token prefill chunk: {prefill * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
