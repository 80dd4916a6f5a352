"""Peer: NVIDIA's ``kvpress`` 0.5.5 (needs transformers < 5.3; pip picks 5.2), in a venv of its own.

``python benchmarks/peers/kvpress_peer.py --inputs DIR/inputs.json --output DIR/kvpress.json``. kvpress compresses
once after the prefill by default; StreamingLLM while decoding is
``DecodingPress(base_press=StreamingLLMPress(n_sink=s), compression_interval=1, target_size=W)``, entered as a
context manager on the model (its hooks stay on while the stream runs). Each call passes the stream's absolute
positions as ``position_ids``, as kvpress's own pipeline does while it generates (keys keep the rotation they were
cached with), and ``cache_position`` counts the cached keys, which is what the causal mask of a chunk needs.
The plain cache is the same release's ``DynamicCache`` on a second copy of the model (the press's hooks are on the
first). Regimes, checks and JSON: ``common``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "kvpress"
REQUIREMENTS = ["kvpress==0.5.5"]


def load(model_dir: str) -> dict[str, Any]:
    """Two copies of the model: ``peer`` (carries the press's hooks while a peer stream is open) and ``plain``."""
    import torch
    import transformers

    def one() -> Any:
        return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return {"peer": one(), "plain": one(), "press": contextlib.ExitStack()}


def streams(models: dict[str, Any], kind: str, window_length: int, num_sink_tokens: int) -> common.StreamFactory:
    """A factory of steps: ``plain`` (``DynamicCache``) or the ``DecodingPress`` stream (a new press each)."""
    import torch
    from kvpress import DecodingPress, StreamingLLMPress
    from transformers import DynamicCache

    model = models["plain"] if kind == "plain" else models["peer"]

    def factory() -> common.Step:
        cache = DynamicCache()
        if kind != "plain":
            models["press"].close()  # the previous stream's hooks off the model
            press = DecodingPress(base_press=StreamingLLMPress(n_sink=num_sink_tokens), compression_interval=1,
                                  target_size=window_length)
            models["press"].enter_context(press(model))
        state = {"seen": 0}

        def step(ids: Any) -> Any:
            n = ids.shape[1]
            cached = cache.get_seq_length()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                        position_ids=torch.arange(state["seen"], state["seen"] + n)[None],
                        cache_position=torch.arange(cached, cached + n))
            state["seen"] += n
            return out.logits[0]
        return step
    return factory


def refused() -> dict[str, Any]:
    """Configurations that would re-position keys while decoding, tried and refused (kvpress's own errors)."""
    from kvpress import DecodingPress, KeyRerotationPress, StreamingLLMPress

    tried = {}
    try:
        DecodingPress(base_press=KeyRerotationPress(press=StreamingLLMPress(n_sink=4)), compression_interval=1,
                      target_size=128)
        tried["DecodingPress(base_press=KeyRerotationPress(StreamingLLMPress))"] = "accepted"
    except Exception as error:
        tried["DecodingPress(base_press=KeyRerotationPress(StreamingLLMPress))"] = \
            f"{type(error).__name__}: {error}"
    return {"configurations_refused": tried}


def main() -> int:
    """Build the venv if needed, then run the protocol."""
    args = common.parser(__doc__.split("\n\n")[0]).parse_args()
    common.ensure_venv(NAME, REQUIREMENTS, args.output)
    from importlib.metadata import version

    import torch
    import transformers

    versions = {"kvpress": version("kvpress"), "transformers": transformers.__version__,
                "torch": torch.__version__}
    notes = ["configured as DecodingPress(base_press=StreamingLLMPress(n_sink=4), compression_interval=1, "
             "target_size=128); window: n_sink=0; absolute position_ids, as kvpress's pipeline passes them"]
    return common.measure(NAME, args, versions, load, streams, notes, extra=refused)


if __name__ == "__main__":
    sys.exit(main())
