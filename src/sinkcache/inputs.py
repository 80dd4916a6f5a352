"""A measuring command's inputs, checked before its model loads: the error that bad input or setup raises, and the
tokenizer, loaded alone so that a text too short is reported before the (slow) model load.

Below every command that measures (``perplexity``, ``sinks``, ``recall``), so that none of them imports another for
these.
"""

from __future__ import annotations

from typing import Any

from . import offline


class BenchmarkError(Exception):
    """Bad input or setup; the message says what to do. The command line prints it as one line and exits 2."""


def load_tokenizer(model_name: str, gguf_file: str | None) -> Any:
    """The tokenizer alone, so that the text is checked before the (slow) model load."""
    from transformers import AutoTokenizer

    try:
        model_name, gguf_file = offline.resolve(model_name, gguf_file)
        return AutoTokenizer.from_pretrained(model_name, **({"gguf_file": gguf_file} if gguf_file else {}))
    except offline.SetupError as error:
        raise BenchmarkError(str(error)) from None
    except (OSError, ImportError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise BenchmarkError(f"Could not load the tokenizer of model {model_name!r}: {first} Pass a local folder, "
                             "a Hub id on a machine with network access, or omit --model for the offline "
                             "default.") from None
