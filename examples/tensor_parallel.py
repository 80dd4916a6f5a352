"""Tensor parallel streaming: one process per device, each holding a slice of every layer's attention heads.

    torchrun --nproc_per_node 2 examples/tensor_parallel.py                      # CPU: gloo, a tiny random Llama
    torchrun --nproc_per_node 2 examples/tensor_parallel.py --model path/to/model --tokens 4000
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint host0:29500 examples/tensor_parallel.py --model ...      # then --node_rank 1 on host1

transformers shards the model (``from_pretrained`` with the ``"auto"`` tensor parallel plan): the query, key and
value projections are split by heads, so each rank's attention layers produce keys for ``num_key_value_heads /
world_size`` heads, and each rank's SinkCache stores only those. Positions are planned on every rank from the same
inputs, with no communication: the only collectives are transformers' own (after the attention output and MLP
projections, and to gather the logits). Every rank therefore computes the same logits and the same tokens.

Without ``--model`` every rank builds the same tiny random Llama (4 heads, 2 key/value heads, seeded) and saves it to
a folder of its own. ``--model`` takes a saved model (safetensors) whose head counts divide by the number of ranks.
The bundled SmolLM2-135M (9 heads, 3 key/value heads: 3 ranks) is a GGUF file, which transformers loads whole on
every rank, ignoring the plan; in safetensors (``--model HuggingFaceTB/SmolLM2-135M-Instruct``, with network access)
it shards. Each rank prints what it holds: its ``SinkCache.nbytes``, the bytes of a DynamicCache holding the window's
tokens, its share of the weights and its resident memory; rank 0 prints the tokens. ``--nproc_per_node 1`` is the
single-process baseline.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel

from sinkcache import CACHE_KWARG, SinkCache, enable_streaming, machine


def tensor_parallel_kwargs() -> dict[str, Any]:
    """``from_pretrained``'s keywords for the model's own ("auto") tensor parallel plan on the installed transformers:
    ``distributed_config=DistributedConfig(tp_plan="auto")`` where it exists (it replaced ``tp_plan=``, which such
    releases deprecate), else ``tp_plan="auto"``."""
    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    if "tp_plan" not in inspect.signature(DistributedConfig).parameters:  # 5.0's is only a placeholder
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def load_tensor_parallel(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Load the model at ``path`` sharded over every process of the ``torchrun`` job (this process's slice only).

    transformers starts ``torch.distributed`` itself from torchrun's environment (gloo on CPU, nccl on CUDA).

    Raises:
        ValueError: the model's attention or key/value heads do not divide by the number of processes (transformers
            does not check: such a model fails inside its first forward with a reshape error).
    """
    config = AutoConfig.from_pretrained(path).get_text_config(decoder=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    heads = {"num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    for name, count in heads.items():
        if count % world:
            raise ValueError(f"{path}: {name} is {count}, which {world} processes cannot share evenly. Run "
                             f"torchrun with a --nproc_per_node (times --nnodes) that divides {count}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations inside its own TP setup
        model = AutoModelForCausalLM.from_pretrained(path, **tensor_parallel_kwargs(), **kwargs)
    return model.eval()


def tiny_llama(path: Path) -> Path:
    """Save a seeded tiny random Llama (4 heads, 2 key/value heads, 2 layers) at ``path``."""
    config = AutoConfig.for_model("llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  initializer_range=0.15, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def kv_heads(cache: SinkCache | DynamicCache) -> int:
    """Key/value heads the cache stores per layer (on this rank)."""
    return int(cache.layers[0].keys.shape[1])


def dynamic_cache_bytes(model: PreTrainedModel, tokens: torch.Tensor) -> int:
    """Bytes of a DynamicCache holding ``tokens`` (keys and values of every layer), on this rank."""
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=tokens, use_cache=True, **{CACHE_KWARG: cache})
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of this rank's share of the parameters (a sharded parameter is a DTensor: its local shard's size).

    That is what the rank computes with; what its process keeps allocated is in the ``rss_bytes`` it prints (the
    loader may keep a shard as a view of the whole tensor it was cut from)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())


def prompt(model: PreTrainedModel, window: int) -> torch.Tensor:
    """A prompt of one window (prefilled in one chunk), so that the DynamicCache compared with holds as many tokens."""
    return (torch.arange(3, 3 + window)[None] % model.config.vocab_size).to(model.device)


def stream(model: PreTrainedModel, window: int, sinks: int, tokens: int) -> tuple[torch.Tensor, SinkCache]:
    """Enable streaming and generate ``tokens`` greedy tokens after ``prompt``; returns them and the cache."""
    enable_streaming(model, window, sinks)
    model.generation_config.eos_token_id = None  # a random model may emit "eos" early: generate all tokens
    cache = SinkCache(window, sinks)
    ids = prompt(model, window)
    out = model.generate(ids, cache=cache, max_new_tokens=tokens, do_sample=False)
    return out[:, ids.shape[1]:], cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved model folder (default: a tiny random Llama)")
    parser.add_argument("--window", type=int, default=64, help="tokens kept by the cache, sinks included")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=200, help="tokens to generate (greedy)")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("run it with torchrun, e.g. `torchrun --nproc_per_node 2 examples/tensor_parallel.py`")

    with tempfile.TemporaryDirectory() as folder:
        # saved before torch.distributed starts: save_pretrained then writes on rank 0 only
        path = args.model or tiny_llama(Path(folder) / "tiny-llama")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # transformers starts it itself for more than one process only; one process is the baseline
        dist.init_process_group()  # gloo for CPU tensors, nccl for CUDA ones where available
        model = load_tensor_parallel(path)
        rank, world = dist.get_rank(), dist.get_world_size()
        new, cache = stream(model, args.window, args.sinks, args.tokens)
        out = torch.cat([prompt(model, args.window), new], dim=1)
        dense = dynamic_cache_bytes(model, out[:, -args.window:])
        config = model.config.get_text_config(decoder=True)
        # fields are key=value for tests/test_tensor_parallel.py
        # one write per line: the ranks share torchrun's output, and print() writes the line end separately
        sys.stdout.write(f"[rank {rank}/{world}] kv_heads={kv_heads(cache)} of={config.num_key_value_heads} "
                         f"streamed={cache.get_seq_length()} kept={cache.cached_length()} "
                         f"sink_cache_bytes={cache.nbytes} dynamic_cache_bytes={dense} "
                         f"weight_bytes={weight_bytes(model)} rss_bytes={machine.status_bytes('VmRSS') or 0}\n")
        sys.stdout.flush()
        dist.barrier()
        if rank == 0 and world > 1 and kv_heads(cache) == config.num_key_value_heads:
            print("[warning] every rank holds all the key/value heads: transformers loaded the whole model on each "
                  "(no tensor parallel plan for this architecture, or a GGUF file)", flush=True)
        if rank == 0:
            print(f"[tokens] {new[0].tolist()}", flush=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
