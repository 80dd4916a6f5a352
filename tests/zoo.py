"""Tiny random models of every architecture the test matrix covers, built from configs (no downloads).

``initializer_range=0.15``: with transformers' default 0.02 attention is nearly uniform and a wrong position
hardly changes the logits, so position bugs would hide.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512, initializer_range=0.15, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)

# name -> (model_type, config overrides). Sliding windows are smaller than the test caches on purpose, so that
# they really cut (6 < window - sinks: no sink visible; 14: some sinks visible).
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(num_key_value_heads=2)),
    "llama-linear": ("llama", dict(num_key_value_heads=2,
                                   rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0))),
    "llama-llama3": ("llama", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64, rope_theta=500000.0))),
    "llama-yarn": ("llama", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=128, rope_theta=10000.0))),
    "llama-dynamic": ("llama", dict(num_key_value_heads=2,
                                    rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=14)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=16)),
    "gemma": ("gemma", dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": ("gemma2", dict(num_key_value_heads=2, head_dim=16, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("gemma3_text", dict(num_key_value_heads=2, head_dim=16, sliding_window=14,
                                   layer_types=["sliding_attention", "full_attention"])),
    # phi3: partial_rotary_factor also at the top level, where transformers 5.0 reads it
    "phi3": ("phi3", dict(num_key_value_heads=2, original_max_position_embeddings=512, partial_rotary_factor=0.5,
                          rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
    "phi3-longrope": ("phi3", dict(
        num_key_value_heads=2, original_max_position_embeddings=128, partial_rotary_factor=0.5, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5, original_max_position_embeddings=128,
            short_factor=[1.0 + i / 8 for i in range(4)], long_factor=[2.0 + i for i in range(4)]))),
    "gpt_neox": ("gpt_neox", dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                       partial_rotary_factor=0.25))),
    "olmo2": ("olmo2", dict(num_key_value_heads=2)),
    "falcon": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, alibi=False)),
    "gpt_oss": ("gpt_oss", dict(num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                                rope_parameters=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                                     original_max_position_embeddings=128, rope_theta=150000.0))),
}


def tiny_model(name: str, attn: str = "sdpa", layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
               **config: object):
    """A deterministic tiny causal LM of architecture ``name`` (a key of ARCHITECTURES, or "gpt2"); ``config``
    overrides its config's entries (e.g. ``sliding_window=64``)."""
    if name == "gpt2":
        model_type, overrides = "gpt2", dict(n_embd=64, n_layer=layers, n_head=4, vocab_size=97, n_positions=512)
        kwargs: dict = {}
    else:
        model_type, overrides = ARCHITECTURES[name]
        kwargs = {**COMMON, "num_hidden_layers": layers, **overrides, **config}
        if "layer_types" in kwargs:
            kwargs["layer_types"] = (kwargs["layer_types"] * layers)[:layers]
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except Exception as error:  # huggingface_hub's validation error derives from Exception only
        # a release's own bug: transformers 5.4 types Olmo2Config.tie_word_embeddings int and refuses its own default
        if "tie_word_embeddings" not in str(error):
            raise
        pytest.skip(f"{name}: transformers {transformers.__version__} cannot build this config ({error})")
    config._attn_implementation = attn
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    except ValueError as error:
        if "does not support an attention implementation" not in str(error):
            raise
        pytest.skip(f"{name}: transformers has no {attn} attention for this architecture")
    return model.eval()
