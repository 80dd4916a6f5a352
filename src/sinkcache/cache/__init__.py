"""The storage of the StreamingLLM cache: ``SinkCache``, which stores keys and values so that every forward call
sees exactly what the policy says.

The policy (which tokens a call attends to, at which positions) is ``policy.Policy``, stated there on one screen and
free of storage. Here, one module per idea, in the order a decode step passes through them (``docs/design.md``):

* ``step.py``: ``begin_step``, called by ``enable_streaming``'s hook before each forward call: the policy, then the
  plan, then the storage, then the model's inputs; and the short path of the decode steady state (rolling in place).
* ``rows.py``: where each row's real tokens start (left padding).
* ``plan.py``: the ``StepPlan`` and what it decides: the buffer's layout (compaction), positions and their re-base,
  the sinks to capture.
* ``tensors.py``: the step's numbers as tensors kept from step to step, and the static shapes' addressing.
* ``group.py``: ``LayerGroup``, the full-attention layers' buffers held together: the sinks' rotation, compaction,
  re-base, the ring, the views.
* ``layers.py``: the layer kinds and their ``update``, which stores the step's keys and values.
* ``storage.py``: what the cache keeps between steps (settings, state, layers, groups, rotation tables, bytes).
* ``sink_cache.py``: ``SinkCache`` itself: its arguments and the transformers ``Cache`` interface.
* ``errors.py``: how the cache refuses a forward call it was not prepared for.
"""

from .errors import GRAD_MODE, INTERRUPTED, NOT_ENABLED, NotEnabledError
from .group import LayerGroup
from .layers import SinkLayer, SlidingLayer, StaticSinkLayer, StreamLayer
from .plan import StepPlan
from .sink_cache import SinkCache
from .tensors import SlotMask, StepNumbers

__all__ = [
    "GRAD_MODE",
    "INTERRUPTED",
    "NOT_ENABLED",
    "LayerGroup",
    "NotEnabledError",
    "SinkCache",
    "SinkLayer",
    "SlidingLayer",
    "SlotMask",
    "StaticSinkLayer",
    "StepNumbers",
    "StepPlan",
    "StreamLayer",
]
