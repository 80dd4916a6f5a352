"""The policy module states the same contract as the oracle: checked against each other on random schedules.

``sinkcache.policy`` is what the cache implements; ``tests/oracle.contract_visible`` is what the oracle tests
check the cache's logits against. They were written separately, so this test is the proof that the policy a reader
checks on one screen is the one the oracle matrix enforces, left padding included.
"""

from __future__ import annotations

import random

import pytest

from sinkcache.policy import Policy
from tests.oracle import contract_visible


def per_token(policy: Policy, calls: list[int], first_real: int) -> list[list[int]]:
    """What each real token sees under ``policy``, in the row's own numbering (its first real token is 0)."""
    visible, seen = [], 0
    for n in calls:
        last = policy.attended(seen, n, first_real)
        for i in range(n):
            if seen + i >= first_real:  # padding columns see nothing
                visible.append([slot - first_real for slot in last[: len(last) - (n - 1 - i)]])
        seen += n
    return visible


@pytest.mark.parametrize("seed", range(40))
def test_policy_is_the_oracles_contract(seed):
    rng = random.Random(seed)
    window = rng.randint(2, 40)
    sinks = rng.randint(0, window - 1)
    calls = [rng.choice([1, 1, 1, 2, 3, 7, window, window + 5]) for _ in range(rng.randint(1, 60))]
    pad = rng.randint(0, calls[0] - 1)  # left padding inside the first call
    row_calls = [calls[0] - pad, *calls[1:]]
    assert per_token(Policy(window, sinks), calls, pad) == contract_visible(row_calls, window, sinks)


def test_a_full_row_attends_to_its_sinks_then_its_window():
    policy = Policy(window_length=8, num_sink_tokens=2)
    assert policy.attended(seen=5, num_new=1) == [0, 1, 2, 3, 4, 5]
    assert policy.attended(seen=20, num_new=1) == [0, 1, 14, 15, 16, 17, 18, 19, 20]
    assert policy.attended(seen=20, num_new=3, first_real=3) == [3, 4, 14, 15, 16, 17, 18, 19, 20, 21, 22]
    assert not policy.is_full(seen=8, first_real=0) and policy.is_full(seen=9, first_real=0)
