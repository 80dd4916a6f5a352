"""Peer: ``attention_sinks`` 0.4.0 (tomaarsen), which needs transformers 4.34.0, in a venv of its own.

``python benchmarks/peers/attention_sinks_peer.py --inputs DIR/inputs.json --output DIR/attention_sinks.json``
(``run.py`` writes the inputs and runs this). The peer is configured as its README says:
``attention_sinks.AutoModelForCausalLM.from_pretrained(dir, attention_sink_size=s, attention_sink_window_size=W - s)``;
it keeps unrotated keys and rotates every cached key to its in-cache position at every step. The plain cache is
transformers 4.34's own (a tuple cache on the unpatched model, same weights). Regimes, checks and JSON: ``common``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "attention_sinks"
# einops: attention_sinks imports it (for models other than Llama) without declaring it
REQUIREMENTS = ["attention_sinks==0.4.0", "transformers==4.34.0", "einops", "safetensors", "numpy"]


def load(model_dir: str) -> dict[str, Any]:
    """The plain model and one patched model per sink count (the sink settings are fixed at load time)."""
    import torch
    import transformers

    plain = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    return {"plain": plain, "dir": model_dir, "patched": {}, "peer": plain}


def patched(models: dict[str, Any], window_length: int, num_sink_tokens: int) -> Any:
    """``attention_sinks``' model for these settings, loaded once (its caches are plain tuples, made per call)."""
    import torch
    from attention_sinks import AutoModelForCausalLM

    key = (window_length, num_sink_tokens)
    if key not in models["patched"]:
        models["patched"].clear()  # one at a time: 540 MB each
        models["patched"][key] = AutoModelForCausalLM.from_pretrained(
            models["dir"], torch_dtype=torch.float32, attention_sink_size=num_sink_tokens,
            attention_sink_window_size=window_length - num_sink_tokens).eval()
    models["peer"] = models["patched"][key]
    return models["peer"]


def streams(models: dict[str, Any], kind: str, window_length: int, num_sink_tokens: int) -> common.StreamFactory:
    """A factory of steps: ``plain`` (transformers 4.34's tuple cache) or the ``attention_sinks`` model."""
    model = models["plain"] if kind == "plain" else patched(models, window_length, num_sink_tokens)

    def factory() -> common.Step:
        state: dict[str, Any] = {"past": None}

        def step(ids: Any) -> Any:
            out = model(input_ids=ids, past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return out.logits[0]
        return step
    return factory


def main() -> int:
    """Build the venv if needed, then run the protocol."""
    args = common.parser(__doc__.split("\n\n")[0]).parse_args()
    common.ensure_venv(NAME, REQUIREMENTS, args.output)
    import attention_sinks
    import torch
    import transformers

    versions = {"attention_sinks": attention_sinks.__version__, "transformers": transformers.__version__,
                "torch": torch.__version__}
    notes = ["configured as attention_sinks.AutoModelForCausalLM.from_pretrained(dir, attention_sink_size=4, "
             "attention_sink_window_size=124); window: attention_sink_size=0, attention_sink_window_size=128",
             "transformers 4.34 has no GGUF loader: the model is the bundled GGUF de-quantised once by run.py "
             "(transformers 5.24) and saved as safetensors, shared by every peer"]
    return common.measure(NAME, args, versions, load, streams, notes)


if __name__ == "__main__":
    sys.exit(main())
