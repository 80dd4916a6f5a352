"""The position contract, checked against the independent oracle on every supported architecture."""

from __future__ import annotations

import copy

import pytest
import torch

import sinkcache
from sinkcache import CACHE_KWARG, SelfCheckError, SinkCache, compat, enable_streaming
from sinkcache.cache import SlidingLayer
from tests.oracle import contract_visible, oracle_logits, recompute_logits
from tests.zoo import ARCHITECTURES, tiny_model

WINDOW, SINKS, STEPS = 16, 4, 72  # 56 evictions; the re-base and compaction both happen several times
TOLERANCE = 1e-4  # float32 logits
WORST: dict[str, float] = {}  # worst difference seen per case, printed at the end of the session


def stream_logits(model, tokens: torch.Tensor, chunks: list[int], cache: SinkCache, mask=None) -> torch.Tensor:
    """Feed ``tokens`` ([batch, T]) in calls of ``chunks`` tokens; return logits [batch, T, vocab]."""
    out, start = [], 0
    with torch.no_grad():
        for n in chunks:
            kwargs = {} if mask is None else {"attention_mask": mask[:, : start + n]}
            out.append(model(input_ids=tokens[:, start : start + n], **{CACHE_KWARG: cache}, **kwargs).logits)
            start += n
    return torch.cat(out, dim=1)


def refused_static_shapes(model, static: bool) -> None:
    """On transformers 5.0-5.1 some architectures build their causal mask themselves (see ``compat``): static shapes
    must then be refused loudly, which is checked here before the case is skipped."""
    if static and compat.builds_legacy_mask(model.base_model):
        enable_streaming(model, WINDOW, SINKS)
        with pytest.raises(ValueError, match="static_shapes=False"):
            model(input_ids=torch.tensor([[5, 6]]), **{CACHE_KWARG: SinkCache(WINDOW, SINKS, static_shapes=True)})
        with pytest.raises(ValueError, match="static_shapes=False"):
            enable_streaming(model, WINDOW, SINKS, static_shapes=True)
        pytest.skip("this model builds its own causal mask on the installed transformers: static shapes refused")


def check_against_oracle(model, chunks, window=WINDOW, sinks=SINKS, seed=0, name="", static=False,
                         verify=True) -> float:
    refused_static_shapes(model, static)
    torch.manual_seed(seed)
    tokens = torch.randint(3, model.config.vocab_size, (sum(chunks),))
    enable_streaming(model, window, sinks, verify=verify)
    got = stream_logits(model, tokens[None], chunks, SinkCache(window, sinks, static_shapes=static))[0]
    want = oracle_logits(model, tokens, contract_visible(chunks, window, sinks), sinks)
    worst = (got - want).abs().max().item()
    if name:  # negative controls are not part of the report
        WORST[name] = max(WORST.get(name, 0.0), worst)
    return worst


@pytest.mark.parametrize("static", [False, True], ids=["views", "static"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_one_token_per_call_matches_oracle(arch, attn, static):
    model = tiny_model(arch, attn)
    name = f"{arch}/{attn}/b1" + ("/static" if static else "")
    assert check_against_oracle(model, [1] * STEPS, name=name, static=static) < TOLERANCE


@pytest.mark.parametrize("static", [False, True], ids=["views", "static"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_left_padded_batch_matches_oracle_per_row(arch, attn, static):
    """Batch of 2, the second row left-padded by 5: each row behaves exactly as its own stream."""
    model = tiny_model(arch, attn)
    refused_static_shapes(model, static)
    enable_streaming(model, WINDOW, SINKS)
    torch.manual_seed(1)
    pad, prompt = 5, 9
    tokens = torch.randint(3, model.config.vocab_size, (2, STEPS))
    tokens[1, :pad] = model.config.pad_token_id
    mask = torch.ones(2, STEPS, dtype=torch.long)
    mask[1, :pad] = 0
    chunks = [prompt] + [1] * (STEPS - prompt)
    got = stream_logits(model, tokens, chunks, SinkCache(WINDOW, SINKS, static_shapes=static), mask)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1, pad:]).all()
    for row, row_chunks, skip in ((0, chunks, 0), (1, [prompt - pad] + chunks[1:], pad)):
        want = oracle_logits(model, tokens[row, skip:], contract_visible(row_chunks, WINDOW, SINKS), SINKS)
        worst = (got[row, skip:] - want).abs().max().item()
        name = f"{arch}/{attn}/b2" + ("/static" if static else "")
        WORST[name] = max(WORST.get(name, 0.0), worst)
        assert worst < TOLERANCE, f"row {row}: {worst}"


@pytest.mark.parametrize("static", [False, True], ids=["views", "static"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_neox", "qwen2", "falcon"])
def test_chunks_match_oracle(arch, static):
    """Several tokens per call: each chunk token sees the cache plus the chunk up to itself."""
    chunks = [7, 1, 5, 3, 1, 1, 20, 2, 9, 1, 4]
    name = f"{arch}/chunks" + ("/static" if static else "")
    assert check_against_oracle(tiny_model(arch), chunks, name=name, static=static) < TOLERANCE


def test_one_layer_equals_fresh_forward_over_kept_tokens():
    """The plain check: for one layer, logits equal a fresh forward over kept tokens + the new one at 0..L."""
    model = tiny_model("llama", layers=1)
    enable_streaming(model, WINDOW, SINKS)
    torch.manual_seed(2)
    tokens = torch.randint(3, 97, (STEPS,))
    got = stream_logits(model, tokens[None], [1] * STEPS, SinkCache(WINDOW, SINKS))[0]
    visible = contract_visible([1] * STEPS, WINDOW, SINKS)
    worst = max((got[t] - recompute_logits(model, tokens, visible[t])).abs().max().item() for t in range(STEPS))
    assert worst < TOLERANCE


@pytest.mark.parametrize("sinks", [0, 1, 4])
@pytest.mark.parametrize("window", [5, 16, 33])
def test_window_and_sink_settings(window, sinks):
    if window <= sinks:
        pytest.skip("invalid setting")
    assert check_against_oracle(tiny_model("llama"), [1] * 80, window, sinks, name="llama/settings") < TOLERANCE


@pytest.mark.parametrize(("arch", "local_window", "rolls"), [
    ("llama", None, True), ("qwen3", None, True),  # qwen3 has a sliding_window size, switched off
    ("qwen2", 6, True), ("gemma2", 6, True),  # sliding windows that cannot reach a sink: a storage of their own
    ("mistral", 14, False), ("gemma3", 14, False),  # windows of 14 reach a sink of a 16-token cache: slot order stays
])
def test_rolls_in_place_unless_a_local_window_is_shorter(arch, local_window, rolls):
    """Past the window, one-token calls roll the full-attention layers' region in place (ring order) unless one of
    those layers has a sliding window shorter than the cache, which needs stream order. A sliding layer whose window
    cannot reach a sink (window - 1 <= window_length - sinks) keeps a storage of its own and rolls by itself. Runs
    of one-token calls (long enough for re-bases while rolling) alternate with chunks, which unroll the rings at
    different phases; every logit must match the oracle."""
    model = tiny_model(arch, "eager" if arch == "gemma2" else "sdpa")
    enable_streaming(model, WINDOW, SINKS)
    assert sinkcache.patch._ENABLED[model].rope.local_window == local_window
    chunks = [20] + [1] * 30 + [3] + [1] * 25 + [7] + [1] * 40 + [2] + [1] * 9
    torch.manual_seed(3)
    tokens = torch.randint(3, model.config.vocab_size, (sum(chunks),))
    cache, rolled, out, start = SinkCache(WINDOW, SINKS), 0, [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(input_ids=tokens[None, start : start + n], **{CACHE_KWARG: cache}).logits[0])
            rolled += cache.ring is not None
            start += n
    assert (rolled > 90) if rolls else (rolled == 0)
    own = [layer for layer in cache.layers if isinstance(layer, SlidingLayer)]
    assert len(own) == (1 if rolls and local_window else 0)
    assert all(layer.keys.shape[-2] == local_window for layer in own)  # a ring of w slots after one-token calls
    want = oracle_logits(model, tokens, contract_visible(chunks, WINDOW, SINKS), SINKS)
    assert (torch.cat(out) - want).abs().max().item() < TOLERANCE


def steady_and_general_run(model, monkeypatch, general: bool) -> tuple[torch.Tensor, SinkCache, int]:
    """A two-row stream with chunks, a beam reorder, a copy of the cache and a switch out of inference mode, on
    the decode steady state's own path (``SinkCache._roll_one``) or with it switched off; returns the logits, the
    cache and how many steps took the steady path."""
    taken = 0
    real_roll, real_steady = SinkCache._roll_one, SinkCache._steady

    def counted(self, *args):
        nonlocal taken
        taken += 1
        return real_roll(self, *args)

    monkeypatch.setattr(SinkCache, "_roll_one", counted)
    monkeypatch.setattr(SinkCache, "_steady", (lambda self, *args: False) if general else real_steady)
    enable_streaming(model, WINDOW, SINKS)
    chunks = [20] + [1] * 45 + [3] + [1] * 40
    torch.manual_seed(5)
    tokens = torch.randint(3, model.config.vocab_size, (2, sum(chunks)))
    cache, out, start = SinkCache(WINDOW, SINKS), [], 0
    for step, n in enumerate(chunks):
        with torch.inference_mode(step < 30), torch.no_grad():
            out.append(model(input_ids=tokens[:, start : start + n], **{CACHE_KWARG: cache}).logits)
        start += n
        if step == 35:
            cache.reorder_cache(torch.tensor([1, 0]))
        if step == 50:
            cache = copy.deepcopy(cache)
    monkeypatch.setattr(SinkCache, "_roll_one", real_roll)
    monkeypatch.setattr(SinkCache, "_steady", real_steady)
    return torch.cat(out, dim=1), cache, taken


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
def test_steady_state_path_equals_the_general_one(arch, monkeypatch):
    """The decode steady state (one token, rolling in place) has a short path of its own; it must give exactly what
    the general path of ``begin_step`` gives: the same logits and the same stored keys and values, bit for bit,
    across re-bases, a chunk that unrolls the ring, a beam reorder, a deep copy and leaving inference mode. A
    steady path that did not move the sinks is caught."""
    model = tiny_model(arch, "eager" if arch == "gemma2" else "sdpa")
    steady, steady_cache, taken = steady_and_general_run(model, monkeypatch, general=False)
    general, general_cache, none = steady_and_general_run(model, monkeypatch, general=True)
    assert taken > 50 and none == 0
    assert torch.equal(steady, general)
    for mine, theirs in zip(steady_cache.groups + steady_cache.sliding_layers,
                            general_cache.groups + general_cache.sliding_layers, strict=True):
        for a, b in zip(mine.units if hasattr(mine, "units") else (mine.keys, mine.values),
                        theirs.units if hasattr(theirs, "units") else (theirs.keys, theirs.values), strict=True):
            assert torch.equal(a, b)
    real_roll = SinkCache._roll_one

    def frozen_sinks(self, *args):  # a steady path that forgets to move the sinks
        groups, self.groups = self.groups, []
        try:
            return real_roll(self, *args)
        finally:
            self.groups = groups

    monkeypatch.setattr(SinkCache, "_roll_one", frozen_sinks)
    frozen, _, _ = steady_and_general_run(model, monkeypatch, general=False)
    assert not torch.allclose(frozen, general, atol=TOLERANCE)


@pytest.mark.parametrize("static", [False, True], ids=["views", "static"])
def test_oracle_is_sensitive(monkeypatch, static):
    """Negative controls: a sink rotation off by one position, or none at all, must fail the oracle test, and
    enable_streaming's self-check must refuse it."""
    real_rotate, users = sinkcache.rotary.rotate, (sinkcache.cache.layers, sinkcache.cache.group)
    model = tiny_model("llama")
    for broken in (lambda k, p, f: real_rotate(k, p + 1, f), lambda k, p, f: k.float()):
        for module in users:  # where the cache rotates keys: the sinks' capture, and the re-base
            monkeypatch.setattr(module, "rotate", broken)
        with pytest.raises(SelfCheckError, match="after evictions"):
            enable_streaming(model, WINDOW, SINKS, static_shapes=static)
        assert check_against_oracle(model, [1] * 40, static=static, verify=False) > 100 * TOLERANCE


def test_oracle_detects_wrong_positions(monkeypatch):
    """Negative control on the hook: absolute stream positions (what generate() passes) must fail."""
    model = tiny_model("llama")
    real = SinkCache.begin_step

    def absolute_positions(self, batch, n, *args):
        start = self.seen
        position_ids, mask = real(self, batch, n, *args)
        return torch.arange(start, start + n)[None].expand_as(position_ids).clone(), mask

    monkeypatch.setattr(SinkCache, "begin_step", absolute_positions)
    with pytest.raises(SelfCheckError):
        enable_streaming(model, WINDOW, SINKS)
    assert check_against_oracle(model, [1] * 40, verify=False) > 100 * TOLERANCE


def test_rotation_table_rewritten_in_place_equals_rotation():
    """The sinks' table is rewritten in place every few steps; its rows must be exactly ``rotation``'s cos/sin at
    every position, and its pre-made row views must follow the rewrite."""
    from sinkcache.rotary import RotationTable, rotation

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    table = RotationTable(inv_freq, length=8)
    for first in (0, 1000, 123_456, 7, 20):  # each outside the previous table: a rewrite
        cos, sin = table.row(first)
        want_cos, want_sin = rotation(torch.arange(first, first + 8), inv_freq)
        assert torch.equal(table.cos, want_cos) and torch.equal(table.sin, want_sin)
        assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])
        last, _ = table.row(first + 7)  # a later step of the same table: a view, no rewrite
        assert table.first == first and last.data_ptr() == table.cos[7].data_ptr()


@pytest.mark.parametrize("count", [2, 3])  # 3: static shapes' query offset too
def test_step_numbers_are_the_aranges_whatever_the_sequence(count):
    """A one-token step's numbers are views of one kept tensor whose columns hold a run of steps that each move
    every number on by one (the next run: one ``add_``; a jump: a refill): after any mix of such steps, jumps (a
    ring's wrap, a re-base) and chunks, each call must give exactly the aranges of its numbers, in the shapes the
    model takes, and a step that moves every number on by one must be served from the kept tensor."""
    from sinkcache.cache import StepNumbers

    numbers, generator = StepNumbers(), torch.Generator().manual_seed(0)
    current, advanced, previous = [40, 7, 8][:count], 0, None
    for _ in range(300):
        kind = torch.randint(0, 6, (), generator=generator).item()
        n = 3 if kind == 0 else 1  # a chunk
        if kind == 1:  # a jump of one number only
            current[1] = int(torch.randint(0, 50, (), generator=generator))
        if kind == 2:  # every number moves back (a re-base)
            current = [x - 20 for x in current]
        got = numbers(tuple(current), n, torch.device("cpu"))
        if n == 1 and previous == [x - 1 for x in current]:
            advanced += 1
            assert all(t.untyped_storage().data_ptr() == numbers.kept.untyped_storage().data_ptr() for t in got)
        previous = current if n == 1 else None
        want = [torch.arange(x, x + n) for x in current]
        assert len(got) == count and got[0].shape == (1, n) and got[1].shape == (n,)
        assert torch.equal(got[0][0], want[0]) and torch.equal(got[1], want[1])
        if count == 3:
            assert got[2].shape == () and int(got[2]) == current[2]
        current = [x + n for x in current]
    assert advanced > 100  # runs went on, not only refills


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 20])  # 20: partial rotary, 4 pass-through dimensions
def test_sinks_rotated_into_storage_are_rounded_once(dtype, head_dim):
    """The sinks' keys are rotated in float32 straight into the storage's slots, through a strided view of them: the
    result must be ``rotate``'s float32 rotation bit for bit, rounded once in a lower-precision storage (never the
    products rounded, then the sum), and the pass-through dimensions must not be written."""
    from sinkcache.rotary import RotationTable, halves, rotate

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    table = RotationTable(inv_freq, length=8)
    keys = torch.randn(3, 2, 4, head_dim, generator=torch.Generator().manual_seed(0)) * 3
    folded = table.fold(keys)
    storage = torch.full((3, 2, 10, head_dim), 7.0, dtype=dtype)
    out = storage[:, :, 5:9]  # a strided view, as the sinks' slots of a buffer
    for position in (0, 5, 1000):
        table.rotate(halves(keys, 8), folded, position, halves(out, 8))
        want = rotate(keys, torch.tensor(position), inv_freq)
        assert torch.equal(out[..., :16], want[..., :16].to(dtype))
        assert bool((out[..., 16:] == 7).all()) and bool((storage[:, :, :5] == 7).all())
