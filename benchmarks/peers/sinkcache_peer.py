"""sinkcache itself, under the same protocol as the peers: run with the project's own environment (transformers 5,
sinkcache importable; no venv of its own).

``python benchmarks/peers/sinkcache_peer.py --inputs DIR/inputs.json --output DIR/sinkcache.json``. The streams are
those of ``sinkcache.perplexity``: ``make_cache`` (``DynamicCache`` for the plain cache, ``SinkCache(W, s)``)
through ``enable_streaming``, fed with the installed release's cache keyword. Regimes, checks and JSON: ``common``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "sinkcache"


def load(model_dir: str) -> Any:
    """The model, streaming enabled (a ``DynamicCache`` passes through it unchanged)."""
    import torch
    import transformers

    import sinkcache

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sinkcache.enable_streaming(model, window_length=128, num_sink_tokens=4)
    return model


def streams(model: Any, kind: str, window_length: int, num_sink_tokens: int) -> common.StreamFactory:
    """A factory of steps with a fresh cache: ``DynamicCache`` (``plain``) or ``SinkCache(W, s)``."""
    from sinkcache import CACHE_KWARG
    from sinkcache.perplexity import make_cache

    regime = "dense" if kind == "plain" else "sink"

    def factory() -> common.Step:
        cache = make_cache(regime, window_length, num_sink_tokens)

        def step(ids: Any) -> Any:
            return model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True).logits[0]
        return step
    return factory


def main() -> int:
    """Run the protocol in the current environment."""
    args = common.parser(__doc__.split("\n\n")[0]).parse_args()
    import torch
    import transformers

    import sinkcache

    versions = {"sinkcache": sinkcache.__version__, "transformers": transformers.__version__,
                "torch": torch.__version__}
    notes = ["configured as enable_streaming(model) and SinkCache(window_length=128, num_sink_tokens=4); window: "
             "num_sink_tokens=0"]
    return common.measure(NAME, args, versions, load, streams, notes)


if __name__ == "__main__":
    sys.exit(main())
