"""The guard (issue 30, item 1): a SinkCache knows what it consumed, and generate() refuses a prompt that does not
begin with it, where it used to feed the prompt from ``cache.seen`` on, by count, silently wrong."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from sinkcache import SinkCache, enable_streaming
from sinkcache.compat import CACHE_KWARG
from sinkcache.ledger import PrefixMismatchError, TokenLedger, extend, prefix_hashes
from tests.zoo import tiny_model

W, S = 16, 4
TOKENS = torch.randint(3, 97, (2, 200), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def model():
    return enable_streaming(tiny_model("llama"), W, S)


def greedy(model, ids, new, **kwargs):
    if ids is not None:  # explicit: a generated 0 (the pad id) would otherwise be inferred as padding
        kwargs.setdefault("attention_mask", torch.ones_like(ids))
    return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)


def test_ledger_counts_and_hashes_what_generate_fed(model):
    cache = SinkCache(W, S)
    out = greedy(model, TOKENS[:1, :40], 10, cache=cache)
    # the last generated token is not fed yet: the ledger covers the prompt and the first 9 generated tokens
    assert cache.ledger.count == cache.seen == 49
    assert cache.ledger.hashes == [extend(0, (int(i) + 1 for i in out[0, :49]))]
    cache.ledger.require_prefix(out)  # the output continues the stream: accepted
    with pytest.raises(PrefixMismatchError, match="not the 49 tokens"):
        cache.ledger.require_prefix(TOKENS[:1, :60])
    with pytest.raises(PrefixMismatchError, match="at least one new one"):  # transformers would feed it all again
        cache.ledger.require_prefix(out[:, :49])


def test_continuing_the_stream_is_accepted_and_a_different_prefix_refused(model):
    cache = SinkCache(W, S)
    out = greedy(model, TOKENS[:1, :40], 10, cache=cache)
    turn2 = torch.cat([out, TOKENS[:1, 100:130]], dim=1)
    wrong = turn2.clone()
    wrong[0, 45] = (wrong[0, 45] + 1) % 97  # one token of the earlier reply differs: a re-tokenized reply
    seen = cache.seen
    with pytest.raises(PrefixMismatchError, match=r"first 49 tokens \(row 0\) are not the 49 tokens.*new SinkCache"):
        greedy(model, wrong, 5, cache=cache)
    assert cache.seen == seen  # refused before anything was fed
    with pytest.raises(PrefixMismatchError, match="prompt has 30 tokens and this SinkCache has already consumed 49"):
        greedy(model, TOKENS[:1, :30], 5, cache=cache)
    with pytest.raises(PrefixMismatchError, match="at least one new one"):  # the consumed tokens and nothing new
        greedy(model, out[:, :49], 5, cache=cache)
    assert cache.seen == seen
    with pytest.raises(ValueError, match="another conversation"):  # PrefixMismatchError is a ValueError
        greedy(model, TOKENS[:1, 100:160], 5, cache=cache)  # another conversation on the same cache
    continued = greedy(model, turn2, 5, cache=cache)  # the right one goes on, exactly as one fresh stream would
    assert cache.ledger.count == cache.seen == 49 + 1 + 30 + 4
    reference = SinkCache(W, S)
    greedy(model, TOKENS[:1, :40], 10, cache=reference)
    assert torch.equal(greedy(model, turn2, 5, cache=reference), continued)


def test_reset_pickle_and_deepcopy_keep_the_ledger_with_the_stream(model):
    cache = SinkCache(W, S)
    out = greedy(model, TOKENS[:1, :40], 6, cache=cache)
    for copied in (pickle.loads(pickle.dumps(cache)), copy.deepcopy(cache)):
        assert copied.ledger.hashes == cache.ledger.hashes and copied.ledger.count == cache.seen
        with pytest.raises(PrefixMismatchError):
            greedy(model, TOKENS[:1, :60], 3, cache=copied)
        assert greedy(model, torch.cat([out, TOKENS[:1, :5]], 1), 3, cache=copied).shape == (1, 46 + 5 + 3)
    cache.reset()
    assert cache.ledger.count == 0 and cache.ledger.hashes is None
    greedy(model, TOKENS[:1, :60], 3, cache=cache)  # a new stream on the reset cache is not refused


def test_a_stream_fed_inputs_embeds_cannot_be_continued_by_generate(model):
    cache = SinkCache(W, S)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(TOKENS[:1, :30])
    out = greedy(model, None, 4, inputs_embeds=embeds, cache=cache)
    assert cache.ledger.unknown and cache.seen == 33
    with pytest.raises(PrefixMismatchError, match="fed inputs_embeds, whose token ids it cannot know.*new SinkCache"):
        greedy(model, torch.cat([TOKENS[:1, :30], out, TOKENS[:1, 50:60]], 1), 3, cache=cache)
    # feeding new columns by hand stays possible (unchecked): the documented way to continue such a stream
    with torch.no_grad():
        model(input_ids=TOKENS[:1, 50:60], **{CACHE_KWARG: cache})
    assert cache.seen == 43


def test_left_padded_batch_is_checked_with_its_padding(model):
    ids = TOKENS[:, :30].clone()
    mask = torch.ones_like(ids)
    mask[1, :7], ids[1, :7] = 0, 0  # row 1 is left-padded by 7
    cache = SinkCache(W, S)
    out = greedy(model, ids, 5, attention_mask=mask, cache=cache)
    assert cache.ledger.padded and len(cache.ledger.hashes) == 2
    turn2 = torch.cat([out, TOKENS[:, 100:110]], 1)
    mask2 = torch.cat([mask, torch.ones(2, 15, dtype=mask.dtype)], 1)
    with pytest.raises(PrefixMismatchError, match="padding columns.*pass generate\\(\\) the attention_mask"):
        greedy(model, turn2, 3, attention_mask=None, cache=copy.deepcopy(cache))
    moved = mask2.clone()
    moved[1, 7] = 0  # one more padding column than was fed
    with pytest.raises(PrefixMismatchError, match=r"\(row 1\)"):
        greedy(model, turn2, 3, attention_mask=moved, cache=copy.deepcopy(cache))
    other_pad = turn2.clone()
    other_pad[1, :7] = 5  # a padding column's id does not matter, only that it is padding
    assert torch.equal(greedy(model, other_pad, 3, attention_mask=mask2, cache=copy.deepcopy(cache))[:, -3:],
                       greedy(model, turn2, 3, attention_mask=mask2, cache=cache)[:, -3:])


def test_rows_follow_the_cache_row_selection_and_prefix_hashes_agree():
    ledger = TokenLedger()
    ledger.record(TOKENS[:, :10], None, 2, 10)
    ledger.record(TOKENS[:, 10:11], None, 2, 1)
    rows = [extend(0, (int(i) + 1 for i in TOKENS[r, :11])) for r in range(2)]
    assert ledger.hashes == rows
    ledger.select_rows(torch.tensor([1, 1, 0]))
    assert ledger.hashes == [rows[1], rows[1], rows[0]]
    hashes = prefix_hashes(TOKENS[0].tolist(), [11, 3, 0])
    assert hashes[11] == rows[0] and hashes[0] == 0 and hashes[3] == extend(0, (int(i) + 1 for i in TOKENS[0, :3]))
