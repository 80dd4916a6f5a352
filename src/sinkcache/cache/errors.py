"""How a ``SinkCache`` refuses to be driven wrongly: its error type, and the messages shared by the places that check.

Every step must be planned by ``enable_streaming``'s hook (``SinkCache.begin_step``) before the model's layers store
their keys; a step that did not finish leaves the stream unusable until ``reset``; and the keys are updated in place,
so gradients cannot flow through them.
"""


class NotEnabledError(RuntimeError):
    """A SinkCache was driven by a forward pass that did not go through ``enable_streaming``'s hook."""


NOT_ENABLED = (
    "SinkCache received keys from a forward pass it was not prepared for. Call sinkcache.enable_streaming(model) "
    "once before using a SinkCache: it assigns the positions inside the cache that the model needs."
)
INTERRUPTED = "A previous forward pass on this SinkCache did not finish; call cache.reset()."
GRAD_MODE = (
    "SinkCache does not support gradients: its keys and values are updated in place as the stream moves on. Wrap "
    "the forward calls in `with torch.no_grad():` or `with torch.inference_mode():` (generate() already runs "
    "without gradients), or freeze the model with model.requires_grad_(False)."
)
