"""Tensor parallel (``from_pretrained`` with the "auto" tp plan, two processes, gloo on CPU) streams exactly.

Each rank's attention layers produce keys for its slice of the key/value heads only, so every per-head assumption of
the cache (buffer shapes, the rotary probe, the layer groups, the sinks' copies) runs on a slice. One ``torchrun``
job (``tests/tp_worker.py``, on 127.0.0.1 only) runs every stream of ``tp_worker.streams`` on each sharded model;
this process runs the same streams on the plain model and compares: logits within float32 noise (the sharded
matmuls sum in another order), the same greedy tokens, and the plain model's one-token and chunked streams against
the oracle, which makes the sharded ones exact too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests import tp_worker
from tests.oracle import contract_visible, oracle_logits
from tests.tp_worker import CHUNKS, PADDING, SINKS, STREAM, WINDOW
from tests.zoo import tiny_model

RANKS = 2
TIMEOUT_S = 240  # per torchrun job, generous: the whole file takes about 40 s on 2 cores
TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[1]
# llama: grouped-query attention (4 heads, 2 key/value heads: one each per rank); gemma3: hybrid sliding-window and
# full layers with two rotary tables (two layer groups); mistral: a sliding window on every layer; qwen2: a sliding
# window on its second layer only.
ARCHITECTURES = ["llama", "gemma3", "mistral", "qwen2"]

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed with the gloo backend", allow_module_level=True)


def free_port() -> int:
    """A free TCP port on the loopback interface (the job listens on 127.0.0.1 only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(script: Path, *arguments: str, timeout: float = TIMEOUT_S) -> str:
    """Run ``script`` in ``RANKS`` processes on this machine, bounded in time; every process is ended on return.
    Returns the job's standard output.

    The rendezvous and gloo stay on the loopback interface: the master address is 127.0.0.1 and gloo's interface is
    ``lo`` (gloo would otherwise resolve the host name). One launcher: with one per simulated node (``--nnodes 2``),
    the agent that hosts the rendezvous store may exit while the other node's worker still tears down, which then
    fails or hangs after its work succeeded (4 of 12 such runs here, with the c10d and the static rendezvous), so the
    multi-node commands are not run here."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(RANKS),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *arguments]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # a session of its own, so that the launcher and its workers are ended together
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            timed_out = process.poll() is None
            if timed_out:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    report = f"exit status {process.returncode}:\n{stdout[-2000:]}\n{stderr[-6000:]}"
    assert not timed_out, f"torchrun {script.name} did not finish in {timeout} s, {report}"
    assert process.returncode == 0, f"torchrun {script.name} failed, {report}"
    return stdout


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each architecture's tiny model, saved for ``from_pretrained``."""
    folder = tmp_path_factory.mktemp("tp-models")
    paths = {}
    for arch in ARCHITECTURES:
        tiny_model(arch).save_pretrained(folder / arch)
        paths[arch] = folder / arch
    return paths


@pytest.fixture(scope="module")
def sharded(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Any]]]:
    """Every rank's results for every architecture, from one torchrun job."""
    out = tmp_path_factory.mktemp("tp-out")
    torchrun(ROOT / "tests" / "tp_worker.py", str(out), *(str(models[arch]) for arch in ARCHITECTURES))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]
    return [{arch: rank[str(models[arch])] for arch in ARCHITECTURES} for rank in ranks]


@pytest.fixture(scope="module")
def plain(models: dict[str, Path]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """The same streams on each plain (one-process) model, loaded from the same files."""
    runs = {}
    for arch in ARCHITECTURES:
        model = AutoModelForCausalLM.from_pretrained(models[arch]).eval()
        runs[arch] = model, tp_worker.streams(model)
    return runs


def sharded_results(sharded: list[dict[str, dict[str, Any]]], arch: str) -> list[dict[str, Any]]:
    """Each rank's results for ``arch``; skips (with transformers' reason) where it cannot shard that model."""
    entry = sharded[0][arch]
    if "skip" in entry:
        pytest.skip(f"{arch}: the installed transformers does not load it tensor parallel: {entry['skip']}")
    return [rank[arch]["results"] for rank in sharded]


def worst(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_rank_caches_its_slice_of_the_heads(sharded, plain, arch):
    """The model really is sharded: each rank's SinkCache stores key/value heads / ranks (else every comparison
    below would compare the plain model with itself)."""
    sharded_results(sharded, arch)
    model, _ = plain[arch]
    heads = model.config.num_key_value_heads
    assert heads % RANKS == 0
    assert [rank[arch]["kv_heads"] for rank in sharded] == [heads // RANKS] * RANKS


@pytest.mark.parametrize("stream", ["one_token", "chunks"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streams_equal_the_single_process_run_and_the_oracle(sharded, plain, arch, stream):
    """One-token calls and chunks past the window: every rank's logits equal the plain model's, which equal the
    oracle's (the position contract), with the same greedy tokens."""
    ranks = sharded_results(sharded, arch)
    model, single = plain[arch]
    sizes = [1] * STREAM if stream == "one_token" else CHUNKS
    want = oracle_logits(model, tp_worker.tokens()[0], contract_visible(sizes, WINDOW, SINKS), SINKS)
    assert worst(single[stream][0], want) < TOLERANCE
    for got in ranks:
        assert worst(got[stream][0], want) < TOLERANCE
        assert torch.equal(got[stream][0].argmax(-1), single[stream][0].argmax(-1))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_left_padded_batch(sharded, plain, arch):
    """A batch of two, the first row left-padded, in chunks: the real tokens' logits equal the plain model's."""
    ranks = sharded_results(sharded, arch)
    _, single = plain[arch]
    want = single["batch"]
    assert want.shape[:2] == (2, STREAM)
    for got in ranks:
        assert worst(got["batch"][0, PADDING:], want[0, PADDING:]) < TOLERANCE
        assert worst(got["batch"][1], want[1]) < TOLERANCE


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_multi_turn_generate(sharded, plain, arch):
    """Two greedy generate() calls on one SinkCache: the same tokens and logits as the plain model on every rank."""
    ranks = sharded_results(sharded, arch)
    _, single = plain[arch]
    assert single["generate_seen"] == 11 + 20 + 9 + 24  # the second turn continued the first turn's stream
    for got in ranks:
        assert torch.equal(got["generate_tokens"], single["generate_tokens"])
        assert worst(got["generate_logits"], single["generate_logits"]) < TOLERANCE
        assert got["generate_seen"] == single["generate_seen"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sampling_with_the_same_seed_on_every_rank(sharded, plain, arch):
    """generate(do_sample=True) past the window, each rank seeded alike: the plain model's tokens on every rank."""
    ranks = sharded_results(sharded, arch)
    _, single = plain[arch]
    for got in ranks:
        assert torch.equal(got["sample_tokens"], single["sample_tokens"])


@pytest.mark.parametrize("stream", ["one_token", "chunks"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_static_shapes(sharded, plain, arch, stream):
    """SinkCache(static_shapes=True) under tensor parallel: the same logits as the plain model's default cache."""
    ranks = sharded_results(sharded, arch)
    _, single = plain[arch]
    assert worst(single[f"static_{stream}"], single[stream]) < TOLERANCE
    for got in ranks:
        assert worst(got[f"static_{stream}"], single[stream]) < TOLERANCE


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_rank_holds_less_cache(sharded, plain, arch):
    """A rank's SinkCache holds its heads' share: less than the plain model's, the same on every rank."""
    ranks = sharded_results(sharded, arch)
    _, single = plain[arch]
    sizes = {got["nbytes"] for got in ranks}
    assert len(sizes) == 1 and sizes.pop() < single["nbytes"]


def test_example_runs_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node 2 examples/tensor_parallel.py``: each rank reports half the key/value heads and
    the same cache size, and the sharded generation gives the tokens of the same model in one process."""
    stdout = torchrun(ROOT / "examples" / "tensor_parallel.py", "--tokens", "40", "--window", "32")
    reports = [dict(re.findall(r"(\w+)=(\d+)", fields))
               for fields in re.findall(r"\[rank \d+/\d+\]((?: \w+=\d+)+)", stdout)]
    assert len(reports) == RANKS, stdout
    assert all(r["kv_heads"] == "1" and r["of"] == "2" and r["kept"] == "32" for r in reports), reports
    assert len({r["sink_cache_bytes"] for r in reports}) == 1
    (tokens,) = re.findall(r"^\[tokens\] \[(.*)\]$", stdout, re.MULTILINE)
    assert [int(token) for token in tokens.split(", ")] == single_process_tokens(tmp_path, 40, 32)


def example_module() -> Any:
    """``examples/tensor_parallel.py`` imported as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("tensor_parallel", ROOT / "examples" / "tensor_parallel.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def single_process_tokens(folder: Path, tokens: int, window: int) -> list[int]:
    """The example's generation on its tiny Llama, in this process without tensor parallel."""
    example = example_module()
    model = AutoModelForCausalLM.from_pretrained(example.tiny_llama(folder / "tiny-llama")).eval()
    new, _ = example.stream(model, window, 4, tokens)
    return new[0].tolist()


def test_heads_that_ranks_cannot_share_are_refused_before_loading(models, monkeypatch):
    """``load_tensor_parallel`` (the example's) refuses 3 processes for 4 heads with what to do: transformers would
    load the model and fail in its first forward with a reshape error."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"num_attention_heads is 4, which 3 processes cannot share evenly.*divides 4"):
        example_module().load_tensor_parallel(models["llama"])
