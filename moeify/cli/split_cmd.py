"""`moeify split MODEL --experts E [--top-k K] [--shared S] -o OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moeify.cli.common import JsonOpt, ModelArg, OverwriteOpt, QuietOpt, TokenOpt, cli_command
from moeify.cli.console import Output
from moeify.split.convert import SplitOptions, split_model
from moeify.split.methods import DEFAULT_METHOD, METHODS


@cli_command
def split(
    out: Output,
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (written atomically).")],
    experts: Annotated[int, typer.Option("--experts", "-e", help="Routed experts per layer.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Experts each token runs through.")] = 2,
    shared: Annotated[int, typer.Option("--shared", "-s", help="Always-on generalist experts (each the size "
                                        "of a routed one).")] = 0,
    method: Annotated[str, typer.Option("--method", help=f"How neurons are grouped: {', '.join(METHODS)}.")]
    = DEFAULT_METHOD,
    target: Annotated[str | None, typer.Option("--target", help="mixtral, qwen2_moe or qwen3_moe (default: by "
                                               "family and --shared).")] = None,
    pad_to: Annotated[int, typer.Option("--pad-to", help="Round expert sizes up to a multiple of this (128 for "
                                        "block FP8); padding neurons are zero.")] = 1,
    dense_layers: Annotated[str | None, typer.Option("--dense-layers", help="Comma-separated layer indices to "
                                                     "keep dense (qwen2_moe/qwen3_moe targets).")] = None,
    calibration: Annotated[str | None, typer.Option("--calibration", help="Text file, folder or hf:DATASET for "
                                                    "data-driven methods (default: shipped mixed text).")] = None,
    calibration_tokens: Annotated[int, typer.Option("--calibration-tokens",
                                                    help="Calibration tokens (512-token chunks).")] = 4096,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (source), bfloat16, float16 or float32.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed for clustering.")] = 0,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision of MODEL.")] = None,
    token: TokenOpt = None,
    overwrite: OverwriteOpt = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Split a dense model's FFNs into experts and write a stock MoE checkpoint."""
    options = SplitOptions(experts=experts, top_k=top_k, shared=shared, method=method, target=target,
                           pad_to=pad_to, dense_layers=parse_layers(dense_layers), calibration=calibration,
                           calibration_tokens=calibration_tokens, dtype=dtype, seed=seed)
    result = split_model(model, output, options, overwrite=overwrite, reporter=out, revision=revision,
                         token=token)
    rows = [("output", result["output"]), ("architecture", result["architecture"]),
            ("experts", f"{experts} routed (top-{top_k}) + {shared} shared, {result['expert_size']} neurons each"),
            ("activation ratio", f"{result['activation_ratio']:.1%} of the dense FFN per token"),
            ("method", method), ("time", f"{result['timings_s']['total']:.1f} s")]
    out.result({k: v for k, v in result.items() if k != "layers"}, title="split", rows=rows)


def parse_layers(text: str | None) -> list[int]:
    from moeify.errors import UsageError

    if not text:
        return []
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--dense-layers {text!r} is not a comma-separated list of integers",
                         "e.g. --dense-layers 0,1,29") from None
