"""The peer comparison's own checks (``benchmarks/peers``): the attended-key observer sees what a cache really
serves and flags a cache that serves something else, the chunk probe, the report's failure rows; and (slow, opt-in)
the driver's smoke mode over every peer, each in the venv its script builds.

The fast tests run on a tiny random Llama in the test environment. The smoke test needs the package registry the
first time (it builds each peer's venv under ``benchmarks/peers/.venvs``): ``python -m pytest -m slow
tests/test_peers.py``; a peer whose environment cannot be built is skipped with the reason.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import sinkcache
from sinkcache import CACHE_KWARG, SinkCache
from tests.zoo import tiny_model

PEERS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS_DIR))
import common  # noqa: E402
import run  # noqa: E402


def test_ranges_and_the_expected_set() -> None:
    assert common.ranges([3, 0, 1, 2, 9, 10, 12]) == "0-3,9-10,12"
    assert common.expected_keys(5, 16, 4) == set(range(6))
    assert common.expected_keys(40, 16, 4) == {0, 1, 2, 3} | set(range(28, 41))  # 4 sinks + 12 cached + itself


def _step(model: torch.nn.Module, cache: object) -> common.Step:
    def step(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True).logits[0]
    return step


def test_observer_confirms_the_sinkcache_contract_and_flags_a_cache_that_keeps_everything() -> None:
    model = tiny_model("llama")
    sinkcache.enable_streaming(model, window_length=16, num_sink_tokens=4)
    ids = torch.randint(3, 97, (41,), generator=torch.Generator().manual_seed(0))
    for cache, exact in ((SinkCache(16, 4), 40), (DynamicCache(), 17)):
        observer = common.AttentionObserver(model, [1], 16, 4)  # layer 0: a repeated token repeats its values
        with observer:
            nll, _ = common.stream_nll(_step(model, cache), ids, observer=observer)
        summary = observer.summary()
        assert len(nll) == 40 and all(math.isfinite(x) for x in nll)
        assert summary["steps"] == 40 and summary["unknown_rows"] == 0 and summary["fingerprint_collisions"] == 0
        assert summary["exact"] == exact, summary  # the DynamicCache matches only while nothing is due for eviction
        assert summary["sinks_kept"] == 40
        if exact < 40:
            assert summary["first_mismatch"]["token"] == 17 and summary["first_mismatch"]["keys"] == 18
            assert summary["max_keys"] == 40
        else:
            assert summary["first_mismatch"] is None and summary["max_keys"] == 17
            assert summary["last_step"]["positions_kv_head_0"] == "0-3,27-39"
    assert torch.nn.functional.scaled_dot_product_attention is observer.sdpa  # unwrapped on exit


def test_observer_counts_unknown_rows() -> None:
    """A key that is no stream token's value (here: a cache whose values were altered) is counted, not ignored."""
    model = tiny_model("llama")
    cache = DynamicCache()
    ids = torch.randint(3, 97, (12,), generator=torch.Generator().manual_seed(1))
    observer = common.AttentionObserver(model, [1], 16, 4)
    step = _step(model, cache)
    with observer, torch.no_grad():
        for t in range(10):
            observer.begin(t)
            step(ids[None, t:t + 1])
            observer.end()
        cache.layers[1].values[:, :, 2] += 1.0  # token 2's value rows no longer match its fingerprints
        observer.begin(10)
        step(ids[None, 10:11])
        observer.end()
    summary = observer.summary()
    assert summary["unknown_rows"] == observer.kv_heads  # token 2's row, once per key/value head
    assert summary["exact"] == 10 and summary["first_mismatch"]["token"] == 10


def test_chunk_probe_passes_sinkcache_and_catches_a_leak() -> None:
    model = tiny_model("llama")
    sinkcache.enable_streaming(model, window_length=16, num_sink_tokens=4)
    ids = torch.randint(3, 97, (64,), generator=torch.Generator().manual_seed(2))
    assert common.chunk_leak(lambda: _step(model, SinkCache(16, 4)), ids, 16, 8, vocab_size=97) == 0.0

    def leaky() -> common.Step:  # a full-attention forward without a cache: every chunk token sees the whole chunk
        def step(chunk: torch.Tensor) -> torch.Tensor:
            mask = torch.ones(1, chunk.shape[1], dtype=torch.long)
            out = model.model(input_ids=chunk, attention_mask=mask, use_cache=False,
                              position_ids=torch.arange(chunk.shape[1])[None])
            return model.lm_head(out.last_hidden_state.mean(dim=1, keepdim=True).expand_as(out.last_hidden_state))[0]
        return step
    assert common.chunk_leak(leaky, ids, 16, 8, vocab_size=97) > 1e-3


def test_table_reports_failures_with_their_error() -> None:
    ok = {"peer": "sinkcache", "status": "ok", "versions": {"sinkcache": "0.1.0"}, "errors": {},
          "regimes": {"sink": {"tokens": 64, "perplexity": 12.5, "attention": None},
                      "dense": {"tokens": 32, "perplexity": 10.0}},
          "speed": [{"window_length": 128, "ratio": 1.03}]}
    broken = {"peer": "kvpress", "status": "failed", "stage": "environment", "error": "`pip install` failed: boom"}
    partial = {"peer": "hf_sinkcache", "status": "ok", "versions": {}, "regimes": {"sink": {"tokens": 64,
               "perplexity": 13.0}}, "errors": {"window": "RuntimeError: no", "long": "RuntimeError: not causal"}}
    text = run.table({"sinkcache": ok, "kvpress": broken, "hf_sinkcache": partial}, None)
    assert "| sinkcache (sinkcache 0.1.0) | 12.500 | – | 10.000 | – | 1.03x @ 128 |" in text
    assert "| kvpress (–) | failed (environment): `pip install` failed: boom |" in text
    assert "failed: RuntimeError: no" in text and "failed: RuntimeError: not causal" in text


@pytest.mark.slow
def test_smoke_mode_of_every_peer(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "slow" not in request.config.getoption("markexpr"):
        pytest.skip("builds a venv per peer from the package registry (minutes): run it with -m slow")
    done = subprocess.run([sys.executable, str(PEERS_DIR / "run.py"), "--smoke", "--output", str(tmp_path),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = []
    for peer in run.PEERS:
        data = json.loads((tmp_path / f"{peer}.json").read_text())
        if data.get("stage") == "environment":
            skipped.append(f"{peer}: {data['error']}")
            continue
        assert data["status"] == "ok", (peer, data.get("error"), data.get("errors"))
        for regime in ("dense", "window", "sink"):
            assert math.isfinite(data["regimes"][regime]["perplexity"]), (peer, regime)
        assert data["regimes"]["sink"]["attention"]["steps"] == 40
    assert (tmp_path / "table.md").read_text().count("\n|") >= 2
    if skipped:
        print("peers skipped, their environment could not be built:", *skipped, sep="\n  ")
        pytest.skip("; ".join(skipped))
