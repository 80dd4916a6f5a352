"""The installed transformers, described by feature: every place where sinkcache depends on its 5.x release.

transformers 5 changed its cache plumbing several times. Each fact below is detected from the installed code (a
signature, an attribute), never from a version string, and the rest of sinkcache reads only these names:

* ``CACHE_KWARG``: the keyword that carries a cache into a model's forward and ``generate()``: ``"cache"`` from 5.24,
  ``"past_key_values"`` before. A model ignores the other one (its ``**kwargs`` swallow it).
* ``cache_keyword(module)``: the same, read from one module's own ``forward`` (remote code may differ).
"""

from __future__ import annotations

import inspect

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


#: The keyword transformers' own models take their cache by (Llama stands for all of them: they move together).
CACHE_KWARG: str = _keyword(list(inspect.signature(modeling_llama.LlamaModel.forward).parameters)) or "cache"
