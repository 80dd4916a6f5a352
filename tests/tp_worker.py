"""The streams of ``tests/test_tensor_parallel.py``, run on a plain model or, under ``torchrun``, on a sharded one.

``torchrun --nproc_per_node 2 tests/tp_worker.py OUT MODEL_DIR...``: every rank loads each saved model with its tensor
parallel plan (``examples/tensor_parallel.py``), runs ``streams`` on it and saves what it got to
``OUT/rank{r}.pt``: ``{model_dir: {"results": {...}, "kv_heads": int}}`` or ``{model_dir: {"skip": reason}}``
where the installed transformers cannot shard that model. The test runs the same ``streams`` on the plain model in
its own process and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from sinkcache import CACHE_KWARG, SinkCache, enable_streaming

WINDOW, SINKS = 16, 4
VOCAB = 97
STREAM = 44  # tokens per stream: past the window (16) more than twice, so sinks move and positions re-base
# sums to STREAM: chunks that compact the buffer, one (17) larger than the slack (16) that grows it, then a token
# that shrinks it back
CHUNKS = [5, 7, 1, 1, 9, 3, 17, 1]
PADDING = 5  # the batch's first row is left-padded by this many columns


def tokens(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, STREAM), generator=torch.Generator().manual_seed(seed))


def feed(model: Any, ids: torch.Tensor, sizes: list[int], cache: SinkCache,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feed ``ids`` in calls of ``sizes`` tokens; the logits of every token, ``[batch, tokens, vocab]``."""
    logits, start = [], 0
    with torch.no_grad():
        for n in sizes:
            extra = {} if mask is None else {"attention_mask": mask[:, : start + n]}
            logits.append(model(input_ids=ids[:, start : start + n], **extra, **{CACHE_KWARG: cache}).logits)
            start += n
    return torch.cat(logits, dim=1)


def streams(model: Any) -> dict[str, Any]:
    """Every stream the test compares: logits (and tokens) of one model, which is enabled here."""
    enable_streaming(model, WINDOW, SINKS, prefill_chunk_size=8)
    model.generation_config.eos_token_id = None  # a random model may emit "eos" early: generate every token
    out: dict[str, Any] = {}
    one = SinkCache(WINDOW, SINKS)
    out["one_token"] = feed(model, tokens(), [1] * STREAM, one)
    out["nbytes"] = one.nbytes  # this rank's cache after STREAM tokens (constant from the second call on)
    out["chunks"] = feed(model, tokens(), CHUNKS, SinkCache(WINDOW, SINKS))
    out["static_one_token"] = feed(model, tokens(), [1] * STREAM, SinkCache(WINDOW, SINKS, static_shapes=True))
    out["static_chunks"] = feed(model, tokens(), CHUNKS, SinkCache(WINDOW, SINKS, static_shapes=True))
    mask = torch.ones(2, STREAM, dtype=torch.long)
    mask[0, :PADDING] = 0
    ids = tokens(batch=2, seed=1).masked_fill(mask == 0, 0)
    out["batch"] = feed(model, ids, CHUNKS, SinkCache(WINDOW, SINKS), mask)
    # two generate() calls on one cache: the second turn continues the stream of the first
    cache, prompt = SinkCache(WINDOW, SINKS), tokens(seed=2)
    options = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)
    first = model.generate(prompt[:, :11], cache=cache, max_new_tokens=20, **options)
    second = model.generate(torch.cat([first.sequences, prompt[:, 11:20]], dim=1), cache=cache, max_new_tokens=25,
                            **options)
    out["generate_tokens"] = second.sequences
    out["generate_logits"] = torch.cat([*first.logits, *second.logits])
    out["generate_seen"] = cache.get_seq_length()
    # sampling: every rank draws from the same (gathered) logits, so every rank must seed its generator alike
    torch.manual_seed(0)
    out["sample_tokens"] = model.generate(prompt, do_sample=True, top_k=20, max_new_tokens=3 * WINDOW)
    return out


def main(out_dir: str, *model_dirs: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from tensor_parallel import kv_heads, load_tensor_parallel

    torch.set_num_threads(1)
    if not dist.is_initialized():  # transformers would start it too, but a skipped model must still reach the barrier
        dist.init_process_group("gloo")
    results: dict[str, dict[str, Any]] = {}
    for path in model_dirs:
        config = AutoConfig.from_pretrained(path)
        if not config.base_model_tp_plan:  # from_pretrained would load the whole model on every rank, unsharded
            results[path] = {"skip": f"transformers has no tensor parallel plan for {config.model_type}"}
            continue
        try:
            model = load_tensor_parallel(path)
        except (NotImplementedError, ValueError) as error:  # no tensor parallel plan for it in this release
            results[path] = {"skip": f"{type(error).__name__}: {error}"}
            continue
        got = streams(model)
        cache = SinkCache(WINDOW, SINKS)
        feed(model, tokens()[:, :2], [2], cache)
        results[path] = {"results": got, "kv_heads": kv_heads(cache)}
    torch.save(results, Path(out_dir) / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
