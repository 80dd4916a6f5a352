"""sinkcache: StreamingLLM attention sinks for Hugging Face transformers 5.

Keep the first few tokens of a stream (the attention sinks) plus a rolling window of recent tokens, with
positions assigned inside the cache, so a causal LM streams indefinitely at constant memory.

    >>> import sinkcache
    >>> sinkcache.enable_streaming(model, window_length=1024, num_sink_tokens=4)
    >>> model.generate(input_ids, max_new_tokens=100_000)
"""

from . import compat
from ._version import __version__
from .cache import NotEnabledError, SinkCache
from .compat import CACHE_KWARG
from .patch import disable_streaming, enable_streaming, is_streaming
from .rotary import UnsupportedModelError
from .selfcheck import SelfCheckError
from .sinks import SinkMeasureError, SinkReport, measure_sinks

__all__ = [
    "SinkCache",
    "CACHE_KWARG",
    "compat",
    "enable_streaming",
    "disable_streaming",
    "is_streaming",
    "NotEnabledError",
    "UnsupportedModelError",
    "SelfCheckError",
    "measure_sinks",
    "SinkReport",
    "SinkMeasureError",
    "__version__",
]
