"""The StreamingLLM policy on its own: which tokens a forward call attends to, and at which positions.

Pure functions of integers, no tensors: ``SinkCache`` (the ``cache`` package) stores and moves keys so that every
forward call sees exactly this, and the tests check the cache's logits against a dense re-encode of the same tokens
at the same positions (``tests/oracle.py``, which shares no code with this module either; ``tests/test_policy.py``
checks the two statements of the contract against each other).

Slots number every column ever fed to the cache, padding included, from 0. A row's stream starts at its first real
slot ``first_real`` (0 without left padding). The README's contract, per row:

* Before a call, the cache holds the row's first ``num_sink_tokens`` tokens (the sinks) and its most recent
  ``window_length - num_sink_tokens`` tokens; all of them while the row has at most ``window_length`` tokens.
* A call of ``n`` tokens evicts nothing while it runs: its token ``i`` attends to the kept tokens and to the call's
  tokens ``0..i``. Eviction back to ``window_length`` happens before the next call.
* The attended tokens sit at consecutive positions in that order (sinks, window, new tokens): as if they had been
  re-encoded contiguously. RoPE only sees query-key distances, so the cache may add one offset to all of them.
* A sliding-window layer of window ``w`` attends, among those, to the tokens less than ``w`` positions before the
  query.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Policy:
    """Sinks plus a rolling window: ``window_length`` tokens kept between calls, sinks included."""

    window_length: int
    num_sink_tokens: int

    def region_start(self, seen: int) -> int:
        """The first slot a call after ``seen`` slots attends to in a row whose stream began before it (a "full"
        row): the row's sinks are placed there, and its window is ``[region_start + num_sink_tokens, seen)``."""
        return max(0, seen - self.window_length)

    def is_full(self, seen: int, first_real: int) -> bool:
        """Whether the row has more than ``window_length`` tokens before the call, i.e. has evicted tokens."""
        return first_real < self.region_start(seen)

    def sink_slots(self, first_real: int) -> range:
        """The slots of the row's sinks: its first ``num_sink_tokens`` real tokens."""
        return range(first_real, first_real + self.num_sink_tokens)

    def attended(self, seen: int, num_new: int, first_real: int = 0) -> list[int]:
        """The slots the last token of a call of ``num_new`` tokens after ``seen`` slots attends to, in position
        order: the sinks, the window, the call's tokens (token ``i`` of the call sees all but the last
        ``num_new - 1 - i``). Position ``p`` of this list is the slot's position in the call, up to one offset."""
        if not self.is_full(seen, first_real):
            return list(range(first_real, seen + num_new))
        window_start = self.region_start(seen) + self.num_sink_tokens
        return [*self.sink_slots(first_real), *range(window_start, seen + num_new)]
