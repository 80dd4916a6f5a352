"""enable_streaming's self-check: it passes on every supported architecture of the installed release, costs nothing
the second time, and refuses each broken plumbing loudly (a cache dropped, a mask that ignores the cache's query
offset, keys rotated at other positions than the cache's)."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from sinkcache import SelfCheckError, SinkCache, compat, enable_streaming, is_streaming, selfcheck
from tests.oracle import contract_visible
from tests.zoo import ARCHITECTURES, tiny_model


def count_forwards(model) -> list[int]:
    """A one-element list counting the model's forward calls from now on."""
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def wrap_decoder(model, change) -> None:
    """Make the model's decoder pass its forward's kwargs through ``change`` after sinkcache's hook has set them, as
    a release whose plumbing differs would."""
    decoder = model.base_model
    forward = decoder.forward

    @functools.wraps(forward)
    def changed(*args, **kwargs):
        cache = kwargs.get(compat.CACHE_KWARG)
        return forward(*args, **(change(kwargs) if isinstance(cache, SinkCache) else kwargs))

    decoder.forward = changed


@pytest.mark.parametrize("static", [False, True], ids=["views", "static"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_passes_on_every_architecture_and_costs_nothing_the_second_time(arch, static):
    model = tiny_model(arch)
    calls = count_forwards(model)
    if static and compat.builds_legacy_mask(model.base_model):
        pytest.skip("static shapes are refused for this model on the installed release (tests/test_positions.py)")
    enable_streaming(model, 16, 4, static_shapes=static)
    # the rotation probe's 2 one-token calls, then the stream's calls and one reference forward
    assert calls[0] == 2 + len(selfcheck.STREAM) + 1 <= 12
    enable_streaming(model, 32, 2, static_shapes=static)
    assert calls[0] == 11 and is_streaming(model)


def test_the_stream_covers_every_state_of_the_cache():
    """The self-check's stream passes through prefill, rolling in place, a chunk that unrolls the ring and grows the
    buffer, a position re-base and the steady state: recorded from the cache after each call."""
    model = enable_streaming(tiny_model("llama"), 16, 4)
    cache, states, start = SinkCache(selfcheck.WINDOW, selfcheck.SINKS), [], 0
    ids = torch.tensor([selfcheck.tokens(97, sum(selfcheck.STREAM))])
    with torch.no_grad():
        for n in selfcheck.STREAM:
            model(input_ids=ids[:, start : start + n], **{compat.CACHE_KWARG: cache})
            start += n
            states.append((cache.ring is not None, cache.offset, cache.plan.capacity))
    rolling = [ring for ring, _, _ in states]
    assert rolling == [False, False, False, True, True, False, True, True]  # a chunk (call 6) unrolls the ring
    assert [offset for _, offset, _ in states].count(0) == 6 and states[6][1] > 0  # call 7 re-bases
    assert states[5][2] > states[4][2]  # the chunk grows the buffer past the rolling ring's slots


def test_reference_layout_follows_the_independent_oracle():
    """What each stream token sees in the self-check's reference equals the test oracle's statement of the contract."""
    order, placed, allowed, _ = selfcheck.reference_inputs(selfcheck.STREAM, selfcheck.WINDOW, selfcheck.SINKS)
    visible = contract_visible(list(selfcheck.STREAM), selfcheck.WINDOW, selfcheck.SINKS)
    for t, want in enumerate(visible):
        assert sorted(order[column] for column in allowed[t].nonzero().flatten().tolist()) == want
        seen = sorted(allowed[t].nonzero().flatten().tolist(), key=lambda column: placed[column])
        # at consecutive positions, the query last: the contract's in-cache distances
        assert [placed[column] for column in seen] == list(range(placed[t] - len(seen) + 1, placed[t] + 1))


def test_verify_false_skips_the_stream_and_bad_values_are_refused():
    model = tiny_model("llama")
    calls = count_forwards(model)
    enable_streaming(model, 16, 4, verify=False)
    assert calls[0] == 2 and is_streaming(model)  # the rotation probe only
    with pytest.raises(TypeError, match="verify must be True or False"):
        enable_streaming(model, 16, 4, verify="no")  # type: ignore[arg-type]


def test_a_training_model_is_checked_in_eval_mode_and_left_as_it_was():
    model = tiny_model("llama", attention_dropout=0.5)
    model.train()
    state = torch.random.get_rng_state()
    enable_streaming(model, 16, 4)  # dropout would make the logits differ: the check runs in eval mode
    assert all(module.training for module in model.modules())
    assert torch.equal(torch.random.get_rng_state(), state)  # fixed tokens: the user's random state is untouched


DIFFERED = r"call \d of 8 \(\d+ tokens?, (before any|after) evictions?\) gave logits up to"


def expect_refusal(model, match: str) -> str:
    with pytest.raises(SelfCheckError, match=match) as caught:
        enable_streaming(model, 16, 4)
    message = str(caught.value)
    assert f"transformers {transformers.__version__}" in message
    assert f"verified is {compat.VERIFIED_TRANSFORMERS}" in message and "Streaming was not enabled" in message
    assert not is_streaming(model) and not model.base_model._forward_pre_hooks  # nothing stays installed
    return message


def test_a_model_that_drops_the_cache_is_refused():
    model = tiny_model("llama")
    wrap_decoder(model, lambda kwargs: {k: v for k, v in kwargs.items() if k != compat.CACHE_KWARG})
    expect_refusal(model, "dropped the cache")


def test_a_mask_that_ignores_the_query_offset_is_refused(monkeypatch):
    """A release whose causal mask does not read the cache's query offset (it would take the new tokens for the
    buffer's first ones): refused (at the first chunk after the prefill: a lone query token sees every key)."""
    monkeypatch.setattr(SinkCache, "get_query_offset", lambda self, layer_idx=0: 0)
    monkeypatch.setattr(SinkCache, "get_seq_length", lambda self, layer_idx=0: 0 if self.stepping else self.seen)
    monkeypatch.setattr(SinkCache, "query_indices", lambda self, device: torch.arange(self.plan.num_new,
                                                                                      device=device))
    expect_refusal(tiny_model("llama"), DIFFERED)


def test_keys_rotated_at_other_positions_are_refused():
    """Keys rotated at twice the cache's positions: the one-token probe (a DynamicCache) cannot see it, the stream
    does from its first chunk."""
    model = tiny_model("llama")
    wrap_decoder(model, lambda kwargs: {**kwargs, "position_ids": 2 * kwargs["position_ids"]})
    assert "call 1 of 8 (6 tokens, before any eviction)" in expect_refusal(model, DIFFERED)


def test_positions_taken_from_the_stream_instead_of_the_cache_are_refused():
    """A release that ignores the position ids it is given and counts positions from the cache's length."""
    model = tiny_model("llama")
    wrap_decoder(model, lambda kwargs: {k: v for k, v in kwargs.items() if k != "position_ids"})
    expect_refusal(model, DIFFERED)

