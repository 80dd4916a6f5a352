"""The installed transformers, described by feature: every place where sinkcache depends on its 5.x release.

transformers 5 changed its cache plumbing three times. sinkcache supports every release from 5.0; each fact below is
detected from the installed code (a signature, an attribute), never from a version string, and the rest of sinkcache
reads only these names. The releases in brackets are where each fact was seen to change.

* The keyword that carries a cache into a model's forward and ``generate()``: ``cache`` [5.24 on] or
  ``past_key_values`` [5.0-5.23]. A model silently ignores the other one (its ``**kwargs`` swallow it), so the hook
  refuses a SinkCache passed under it (``cache_keyword``, ``CACHE_KWARG``).
* Where the causal mask takes its query indices from:
  - the model's ``cache_position`` argument [5.0-5.3]: the hook passes the new tokens' buffer indices
    (``takes_cache_position``);
  - ``Cache.get_seq_length()`` read during the forward [5.4-5.13]: a SinkCache answers with the query's buffer index
    while a step runs (``QUERY_OFFSET_FROM_SEQ_LENGTH``);
  - ``Cache.get_query_offset()`` [5.14 on].
* Models that still build their causal mask themselves (``_update_causal_mask``, 28 architectures in 5.0-5.1,
  Falcon among them) cannot take the static-shape layout's mask (``builds_legacy_mask``): that is refused.
* The abstract methods of ``CacheLayerMixin``: ``get_max_cache_shape`` [5.0-5.12] or ``get_max_length`` [5.13 on];
  ``SinkLayer`` implements both, and ``tests/test_compat.py`` checks that it leaves none abstract.
"""

from __future__ import annotations

import inspect

from transformers.cache_utils import Cache
from transformers.models.llama import modeling_llama


def forward_parameters(module: object) -> list[str]:
    """Names of ``module.forward``'s parameters (decorators that use ``functools.wraps`` are seen through)."""
    return list(inspect.signature(module.forward).parameters)  # type: ignore[attr-defined]


def _keyword(names: list[str]) -> str | None:
    for name in ("cache", "past_key_values"):
        if name in names:
            return name
    return None


def cache_keyword(module: object) -> str | None:
    """The keyword that ``module``'s forward takes its cache by, or ``None`` when it takes none."""
    return _keyword(forward_parameters(module))


def takes_cache_position(module: object) -> bool:
    """Whether ``module``'s forward takes ``cache_position``, from which its causal mask reads the query indices."""
    return "cache_position" in forward_parameters(module)


def builds_legacy_mask(module: object) -> bool:
    """Whether ``module`` builds its 4D causal mask itself from ``cache_position`` (transformers' pre-5 way)."""
    return hasattr(module, "_update_causal_mask")


#: The keyword transformers' own models take their cache by (Llama stands for all of them: they move together).
CACHE_KWARG: str = _keyword(forward_parameters(modeling_llama.LlamaModel)) or "cache"

#: The newest transformers release on which sinkcache's CI ran the compatibility matrix (``scripts/compat_matrix.py``
#: keeps it equal to the newest passing row of ``docs/compat/results.json``). Newer releases install too: the
#: self-check of ``enable_streaming`` (``selfcheck``) proves each one on the user's own model.
VERIFIED_TRANSFORMERS = "5.25.0"

#: Whether the causal mask reads the query's index from ``Cache.get_seq_length()`` (no ``get_query_offset`` yet).
QUERY_OFFSET_FROM_SEQ_LENGTH: bool = not hasattr(Cache, "get_query_offset")


def wrong_keyword_message(keyword: str) -> str:
    """The error for a SinkCache passed as ``cache=`` to a model that takes ``keyword`` and would ignore it."""
    return (
        f"This model takes its cache as `{keyword}=`; it would silently ignore `cache=` (a keyword transformers "
        f"accepts from 5.24 on) and run without the SinkCache. Pass `{keyword}=cache`, or use "
        "`**{sinkcache.CACHE_KWARG: cache}`, which names the right keyword on every transformers 5.x."
    )


LEGACY_MASK_STATIC = (
    "SinkCache(static_shapes=True) needs transformers' shared mask functions, but this model builds its causal mask "
    "itself on the installed transformers (it has `_update_causal_mask`; transformers 5.2 and later removed those). "
    "Use static_shapes=False, or upgrade transformers."
)
