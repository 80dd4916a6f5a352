"""What a ``SinkCache`` has consumed, in O(1) memory per row: the guard against continuing a stream with the wrong
prompt.

``generate()`` on a cache that has already seen ``cache.seen`` columns feeds the prompt from column ``cache.seen``
on: it trusts, by count, that the prompt's first ``cache.seen`` columns are the ones consumed. A prompt that is not
(another conversation, or a reply that tokenizes differently once a chat template renders it again) would be
continued silently wrong. The ``TokenLedger`` on every ``SinkCache`` (``cache.ledger``) records each column the
decoder is fed (sinkcache's forward pre-hook calls ``record`` on every step) as a rolling polynomial hash per row,
and ``require_prefix`` refuses a prompt whose first columns hash differently.

What is hashed, per row and column: ``token id + 1`` for a real token and ``0`` for a padding column (a column whose
``attention_mask`` is 0: its id does not matter to the cache, which masks and zeroes it, but that it is padding
does). The hash is ``sum(v_i * BASE**(n-1-i)) mod (2**61 - 1)``: two different streams of ``n`` columns collide
with probability below ``n / 2**61`` (the fixed ``BASE`` is arbitrary; the guard protects against mistakes, not
against an adversary who crafts collisions).

Streams whose ids cannot be checked are refused rather than trusted:

* a stream that was fed ``inputs_embeds`` at any step has no known ids from then on: continuing it through
  ``generate()`` raises (start a new ``SinkCache`` per such prompt, or feed ``input_ids``);
* a prompt given as ``inputs_embeds`` to a cache that has consumed columns cannot be compared with them: refused too;
* a stream with padding columns must be continued with the ``attention_mask`` it was fed with (padding is part of
  what is checked), so a call without one is refused with a message saying to pass it.

Calling the model directly (``model(input_ids=new, cache=cache)``) feeds only new tokens and is not checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

MODULUS = 2**61 - 1  # a Mersenne prime: Python's ints make the reduction exact at any size
BASE = 0x5BD1E9955BD1E995 % MODULUS  # any fixed value above the largest token id + 1 serves


class PrefixMismatchError(ValueError):
    """A prompt given to ``generate()`` does not begin with the tokens its ``SinkCache`` has consumed."""


def extend(value: int, columns: Iterable[int]) -> int:
    """The rolling hash ``value`` extended by ``columns`` (each a token id + 1, or 0 for padding)."""
    for column in columns:
        value = (value * BASE + column) % MODULUS
    return value


def prefix_hashes(ids: Sequence[int], lengths: Iterable[int]) -> dict[int, int]:
    """The hash of ``ids[:n]`` (all real tokens) for every ``n`` in ``lengths`` (each ``<= len(ids)``), in one pass
    over the ids: how a server compares one request with many ledgers at once."""
    wanted = sorted(set(lengths))
    out, value, done = {}, 0, 0
    for n in wanted:
        value = extend(value, (i + 1 for i in ids[done:n]))
        out[n], done = value, n
    return out


def _columns(ids: torch.Tensor, real: torch.Tensor | None) -> list[list[int]]:
    """Per row, what the hash takes for each column of ``ids`` [batch, n] (``real``: [batch, n] bool or None)."""
    values = ids.detach().to("cpu", torch.long) + 1
    if real is not None:
        values = values * real.detach().to("cpu", torch.bool)
    return values.tolist()


class TokenLedger:
    """The columns a ``SinkCache`` consumed: their count and one rolling hash per row (O(batch) memory).

    Attributes:
        count: columns consumed, padding included (equals ``cache.seen``).
        hashes: one hash per row, or ``None`` before the first step.
        unknown: why the consumed ids are unknown (a step fed ``inputs_embeds``), or ``None`` when they are known.
        padded: whether any consumed column was padding.
    """

    def __init__(self) -> None:
        self.count = 0
        self.hashes: list[int] | None = None
        self.unknown: str | None = None
        self.padded = False

    def __repr__(self) -> str:
        return f"TokenLedger(count={self.count}, rows={len(self.hashes or [])}, unknown={self.unknown!r})"

    def record(self, ids: torch.Tensor | None, real: torch.Tensor | None, batch: int, n: int) -> None:
        """Add one forward call's ``n`` new columns for ``batch`` rows.

        Args:
            ids: ``[batch, n]`` token ids, or ``None`` when the call was given ``inputs_embeds``.
            real: ``[batch, n]`` bool, which columns are real tokens (``None``: all are).
        """
        self.count += n
        if ids is None:
            self.unknown = "it was fed inputs_embeds, whose token ids it cannot know"
            self.hashes = None
            return
        if self.unknown is not None:
            return
        if real is not None and not bool(real.all()):
            self.padded = True
        else:
            real = None
        if self.hashes is not None and len(self.hashes) != batch:
            self.unknown, self.hashes = f"its batch changed from {len(self.hashes)} rows to {batch}", None
            return
        hashes = self.hashes if self.hashes is not None else [0] * batch
        self.hashes = [extend(h, row) for h, row in zip(hashes, _columns(ids, real))]

    def select_rows(self, index: torch.Tensor) -> None:
        """Follow the cache's row selection (beam search, ``num_return_sequences``): row ``i`` becomes ``index[i]``."""
        if self.hashes is not None:
            self.hashes = [self.hashes[i] for i in index.tolist()]

    def require_prefix(self, ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None) -> None:
        """Check that a prompt continues the stream: its first ``count`` columns are those consumed.

        Args:
            ids: the prompt's ``[batch, columns]`` token ids, the whole conversation so far; ``None`` for a prompt
                given as ``inputs_embeds``.
            attention_mask: the prompt's ``[batch, columns]`` padding mask, or ``None`` (every column real).

        Cost: one pass over the first ``count`` columns (about 0.1 microseconds a column).

        Raises:
            PrefixMismatchError: the prompt does not begin with the consumed columns, or that cannot be checked;
                the message says what to do.
        """
        if self.count == 0:
            return
        fresh = "Start a new SinkCache (or call cache.reset()) for a prompt that does not continue its stream."
        if ids is None:
            raise PrefixMismatchError(
                f"This SinkCache has consumed {self.count} tokens and the prompt is given as inputs_embeds, which "
                "cannot be compared with them: generate() would feed the prompt from column "
                f"{self.count} on without knowing whether its first {self.count} columns are the ones consumed. "
                f"{fresh} To continue a stream by embeddings, call the model directly with the new columns only "
                "(model(inputs_embeds=new, cache=cache)).")
        if self.unknown is not None or self.hashes is None:
            raise PrefixMismatchError(
                f"This SinkCache cannot check that the prompt continues its stream: {self.unknown or 'no ids'}. "
                f"{fresh} To continue such a stream, call the model directly with the new columns only.")
        batch, columns = ids.shape[0], ids.shape[-1]
        if columns <= self.count:  # transformers would then feed the whole prompt again, on top of the cache
            raise PrefixMismatchError(
                f"The prompt has {columns} tokens and this SinkCache has already consumed {self.count}: generate() "
                "takes the whole conversation so far (the consumed tokens, then at least one new one). " + fresh)
        if batch != len(self.hashes):
            raise PrefixMismatchError(
                f"The prompt has {batch} rows but this SinkCache's stream has {len(self.hashes)}. " + fresh)
        if attention_mask is None and self.padded:
            raise PrefixMismatchError(
                "This SinkCache's stream has padding columns, which are part of what it checks: pass generate() "
                "the attention_mask of the whole conversation (the one it was fed with, extended by the new "
                "columns).")
        real = None if attention_mask is None else attention_mask[:, : self.count].bool()
        for row, (expected, values) in enumerate(zip(self.hashes, _columns(ids[:, : self.count], real))):
            if extend(0, values) != expected:
                raise PrefixMismatchError(
                    f"The prompt's first {self.count} tokens (row {row}) are not the {self.count} tokens this "
                    "SinkCache has consumed (another conversation, or an earlier turn tokenized differently), so "
                    "generate() would continue it silently wrong (it feeds the prompt "
                    f"from column {self.count} on). Pass the whole conversation exactly as fed: the earlier prompts "
                    "and the generated ids as generate() returned them, not the text re-tokenized (a chat template "
                    "can tokenize a reply differently). " + fresh)
