"""StreamingLLM generation through sinkcache, as a transformers ``custom_generate`` repository.

transformers removed its own ``SinkCache`` and points users to a ``custom_generate`` repository on the Hub instead.
This folder is such a repository, built on sinkcache: copy it (or this repository) to the Hub, or pass a local
path, and any RoPE causal LM streams with attention sinks and exact positions::

    model.generate(input_ids, custom_generate="path/or/hub-repo", trust_remote_code=True,
                   window_length=1024, num_sink_tokens=4, max_new_tokens=10_000)

transformers calls ``generate`` below with the model and every other argument of ``model.generate``. It enables
sinkcache's streaming on the model for the call (the self-check runs once per model and process), generates with
a fresh ``SinkCache(window_length, num_sink_tokens)`` unless a SinkCache is passed, and leaves the model as it was.
"""

from __future__ import annotations

from typing import Any

import sinkcache


def generate(model: Any, window_length: int = 1024, num_sink_tokens: int = 4, static_shapes: bool = False,
             prefill_chunk_size: int | None = None, **kwargs: Any) -> Any:
    """``model.generate(**kwargs)`` with a SinkCache of ``window_length`` tokens, ``num_sink_tokens`` of them sinks.

    A ``SinkCache`` passed as ``cache=`` / ``past_key_values=`` is used as given (a conversation that goes on);
    ``prefill_chunk_size`` (default: ``window_length``) bounds the prompt's memory by the cache size.
    """
    cache, legacy = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)  # (an empty Cache is falsy)
    cache = legacy if cache is None else cache
    if cache is None:
        cache = sinkcache.SinkCache(window_length, num_sink_tokens, static_shapes=static_shapes)
    elif not isinstance(cache, sinkcache.SinkCache):
        raise TypeError(f"custom_generate=sinkcache streams with a sinkcache.SinkCache, got a {type(cache).__name__}; "
                        "drop the cache argument or pass a SinkCache.")
    inputs = kwargs.pop("inputs", None)  # generate()'s first parameter, under its name
    was_streaming = sinkcache.is_streaming(model)
    if not was_streaming:
        sinkcache.enable_streaming(model, window_length, num_sink_tokens, static_shapes=static_shapes,
                                   prefill_chunk_size=prefill_chunk_size)
    try:
        return model.generate(inputs, **kwargs, **{sinkcache.CACHE_KWARG: cache})
    finally:
        if not was_streaming:
            sinkcache.disable_streaming(model)
