"""`moeify eval MODEL [--baseline DENSE] [--text FILE] [--plot load.png]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moeify.cli.common import JsonOpt, ModelArg, QuietOpt, cli_command
from moeify.cli.console import Output
from moeify.device import DEVICE_HELP


@cli_command
def eval_command(
    out: Output,
    model: ModelArg,
    baseline: Annotated[str | None, typer.Option("--baseline", help="The dense model it came from: adds the "
                                                 "perplexity ratio and per-layer reconstruction error.")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Text file, folder or hf:DATASET (default: a "
                                             "held-out novel excerpt shipped with moeify).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per chunk.")] = 512,
    max_chunks: Annotated[int | None, typer.Option("--max-chunks", help="Score at most this many chunks.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of expert load per layer and a "
                                              "perplexity bar chart (needs matplotlib).")] = None,
    recompute_baseline: Annotated[bool, typer.Option("--recompute-baseline", help="Score --baseline again even "
                                                     "if its perplexity on these tokens is cached.")] = False,
    device: Annotated[str, typer.Option("--device", help="Where the forward passes run: " + DEVICE_HELP)] = "auto",
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity, activation ratio, expert load and reconstruction error of a (split) model."""
    from moeify.evaluate import EvalOptions, evaluate_model

    options = EvalOptions(text, seq_len, max_chunks, str(plot) if plot is not None else None,
                          baseline_cache=not recompute_baseline, device=device)
    result = evaluate_model(model, options, baseline=baseline, reporter=out)
    rows = [("model", result["model"]), ("tokens", f"{result['tokens']} ({result['chunks']} x {seq_len})"),
            ("perplexity", f"{result['perplexity']:.3f}")]
    if "baseline_perplexity" in result:
        cached = " (cached: same weights and tokens)" if result.get("baseline_cached") else ""
        rows += [("baseline perplexity", f"{result['baseline_perplexity']:.3f}{cached}"),
                 ("ratio to baseline", f"{result['perplexity_ratio']:.3f}x")]
    if result.get("activation_ratio") is not None:
        rows.append(("activation ratio", f"{result['activation_ratio']:.1%} of the dense FFN per token"))
    rows += _traffic_rows(result)
    rows.append(("time", f"{result['seconds']:.1f} s"))
    if "plot" in result:
        rows.append(("plot", result["plot"]))
    out.result(result, title="eval", rows=rows, tables=[_layer_table(result)] if "expert_load" in result else [])


def _traffic_rows(result: dict) -> list[tuple[str, str]]:
    """Active parameters and weight bytes per decoded token against the dense model (added to `result`)."""
    from moeify.describe import decode_traffic_vs

    traffic = decode_traffic_vs(result["model"], result.get("baseline"))
    result.update(traffic)
    params, nbytes = traffic["active_parameters_per_token"], traffic["weight_bytes_per_token"]
    if "dense_weight_bytes_per_token" not in traffic:
        return [("active params/token", f"{params:,}"), ("weight bytes/token", f"{nbytes / 1e6:.1f} MB")]
    dense_p, dense_b = traffic["dense_parameters_per_token"], traffic["dense_weight_bytes_per_token"]
    return [("active params/token", f"{params:,} ({params / dense_p:.1%} of dense {dense_p:,})"),
            ("weight bytes/token", f"{nbytes / 1e6:.1f} MB (dense {dense_b / 1e6:.1f} MB: decode speed-up "
                                   f"bound {traffic['decode_bound_vs_dense']:.2f}x at batch 1)")]


def _layer_table(result: dict) -> Table:
    """One row per MoE layer: token share of each expert, imbalance, reconstruction error."""
    errors = result.get("layer_reconstruction_error")
    table = Table("layer", "expert load (% of routed tokens)", "max/mean", *(["recon. error"] if errors else []),
                  box=None, pad_edge=False, title="experts")
    for layer, counts in result["expert_load"].items():
        total = max(1, sum(counts))
        shares = " ".join(f"{100 * c / total:4.1f}" for c in counts)
        row = [layer, shares, f"{result['load_imbalance'][layer]:.2f}"]
        if errors:
            row.append(f"{errors[int(layer)]:.4f}")
        table.add_row(*row)
    return table
