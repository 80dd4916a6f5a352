"""Peer: transformers' own former ``SinkCache``, in transformers 4.52.4 (deprecated there, removed in 4.53).

``python benchmarks/peers/hf_sinkcache_peer.py --inputs DIR/inputs.json --output DIR/hf_sinkcache.json``. Configured
as its docstring says: ``model(ids, past_key_values=SinkCache(window_length=W, num_sink_tokens=s))``; the model then
gives each step positions inside the cache, and the cache re-rotates the kept keys by one position per eviction.
The plain cache is the same release's ``DynamicCache``. Regimes, checks and JSON: ``common``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "hf_sinkcache"
REQUIREMENTS = ["transformers==4.52.4", "safetensors", "numpy"]


def load(model_dir: str) -> Any:
    """The model (one: the cache object decides the regime)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


def streams(model: Any, kind: str, window_length: int, num_sink_tokens: int) -> common.StreamFactory:
    """A factory of steps with a fresh ``DynamicCache`` (``plain``) or ``SinkCache(W, s)`` each."""
    from transformers import DynamicCache, SinkCache

    def factory() -> common.Step:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its deprecation notice
            cache = DynamicCache() if kind == "plain" else SinkCache(window_length=window_length,
                                                                     num_sink_tokens=num_sink_tokens)

        def step(ids: Any) -> Any:
            return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0]
        return step
    return factory


def main() -> int:
    """Build the venv if needed, then run the protocol."""
    args = common.parser(__doc__.split("\n\n")[0]).parse_args()
    common.ensure_venv(NAME, REQUIREMENTS, args.output)
    import torch
    import transformers

    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    notes = ["configured as SinkCache(window_length=128, num_sink_tokens=4) passed as past_key_values; window: "
             "num_sink_tokens=0"]
    return common.measure(NAME, args, versions, load, streams, notes)


if __name__ == "__main__":
    sys.exit(main())
