"""`moeify split MODEL [--active R] [--experts E] [--top-k K] [--shared S] -o OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moeify.cli.common import JsonOpt, ModelArg, OverwriteOpt, QuietOpt, TokenOpt, cli_command
from moeify.cli.console import Output
from moeify.device import DEVICE_HELP
from moeify.split.convert import SplitOptions, split_model
from moeify.split.methods import DEFAULT_METHOD, METHODS
from moeify.split.methods.activations import STREAMS

DEFAULTS = SplitOptions()  # one home for every default: the library's


@cli_command
def split(
    out: Output,
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (written atomically).")],
    experts: Annotated[int | None, typer.Option("--experts", "-e", help="Routed experts per layer (default: 64 "
                                                "blocks of the FFN, less the shared ones).", show_default=False)]
    = None,
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", help="Experts each token runs through (default: "
                                              "chosen from --active).", show_default=False)] = None,
    shared: Annotated[int | None, typer.Option("--shared", "-s", help="Always-on generalist experts, each the size "
                                               "of a routed one (default: half of the active share; 0 when "
                                               "--top-k is given).", show_default=False)] = None,
    active: Annotated[float | None, typer.Option("--active", help="Share of the FFN each token uses, e.g. 0.25 or "
                                                 "0.5 (default 0.5): picks --top-k and --shared.",
                                                 show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", help=f"How neurons are grouped: {', '.join(METHODS)}.")]
    = DEFAULT_METHOD,
    target: Annotated[str | None, typer.Option("--target", help="mixtral, qwen2_moe or qwen3_moe (default: by "
                                               "family and --shared).")] = None,
    pad_to: Annotated[int, typer.Option("--pad-to", help="Round expert sizes up to a multiple of this (128 for "
                                        "block FP8); padding neurons are zero.")] = 1,
    dense_layers: Annotated[str | None, typer.Option("--dense-layers", help="Comma-separated layer indices to "
                                                     "keep dense (qwen2_moe/qwen3_moe targets), or auto: the "
                                                     "layers that split worst, within the --active budget "
                                                     "(auto:N: exactly N).")] = None,
    calibration: Annotated[str | None, typer.Option("--calibration", help="Text file, folder or hf:DATASET for "
                                                    "data-driven methods (default: shipped mixed text).")] = None,
    calibration_tokens: Annotated[int, typer.Option("--calibration-tokens",
                                                    help="Calibration tokens (512-token chunks).")]
    = DEFAULTS.calibration_tokens,
    stream: Annotated[str, typer.Option("--stream", help=f"Calibration stream: {', '.join(STREAMS)} (see "
                                        "docs/quality.md).")] = DEFAULTS.stream,
    down_ridge: Annotated[float, typer.Option("--down-ridge", help="Ridge strength of the down-projection "
                                              "repair.")] = DEFAULTS.down_ridge,
    router_ridge: Annotated[float, typer.Option("--router-ridge", help="Ridge strength of the router fit.")]
    = DEFAULTS.router_ridge,
    reassign_rounds: Annotated[int, typer.Option("--reassign-rounds", help="Router-aware reassignment rounds "
                                                 "after the grouping (0: off).")] = DEFAULTS.reassign_rounds,
    refine_steps: Annotated[int, typer.Option("--refine-steps", help="Layer-local refinement steps per layer "
                                              "after the closed-form fit (0: off).")] = DEFAULTS.refine_steps,
    refine_lr: Annotated[float, typer.Option("--refine-lr", help="Refinement step size, relative to each "
                                             "tensor's scale.")] = DEFAULTS.refine_lr,
    refine_batch: Annotated[int, typer.Option("--refine-batch", help="Tokens per refinement step.")]
    = DEFAULTS.refine_batch,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (source), bfloat16, float16 or float32.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed for clustering.")] = 0,
    device: Annotated[str, typer.Option("--device", help="Where calibration, clustering, router fit and repair "
                                        "run: " + DEVICE_HELP)] = DEFAULTS.device,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision of MODEL.")] = None,
    token: TokenOpt = None,
    overwrite: OverwriteOpt = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Split a dense model's FFNs into experts and write a stock MoE checkpoint."""
    options = SplitOptions(experts=experts, top_k=top_k, shared=shared, active=active, method=method, target=target,
                           pad_to=pad_to, dense_layers=parse_layers(dense_layers), calibration=calibration,
                           calibration_tokens=calibration_tokens, dtype=dtype, seed=seed, stream=stream,
                           down_ridge=down_ridge, router_ridge=router_ridge, reassign_rounds=reassign_rounds,
                           refine_steps=refine_steps,
                           refine_lr=refine_lr, refine_batch=refine_batch, device=device)
    result = split_model(model, output, options, overwrite=overwrite, reporter=out, revision=revision,
                         token=token)
    o = result["options"]
    rows = [("output", result["output"]), ("architecture", result["architecture"]),
            ("experts", f"{o['experts']} routed (top-{o['top_k']}) + {o['shared']} shared, "
                        f"{result['expert_size']} neurons each"),
            ("activation ratio", f"{result['activation_ratio']:.1%} of the dense FFN per token "
                                 f"({active_hint(result['activation_ratio'])})"),
            ("method", method), ("time", f"{result['timings_s']['total']:.1f} s")]
    auto = result.get("dense_layers_auto")
    if result["dense_layers"] or auto:
        chosen = ", ".join(map(str, result["dense_layers"])) or "none"
        rows.insert(3, ("dense layers", chosen if auto is None else f"{chosen} (--dense-layers {auto['request']}: "
                                                                    "highest screened error)"))
    out.result({k: v for k, v in result.items() if k != "layers"}, title="split", rows=rows)


def active_hint(ratio: float) -> str:
    """Point at --active with a share unlike the split just made, so the suggestion is a real alternative:
    a quarter after about half or more of the FFN (the default), half after a smaller share."""
    return f"another with --active, e.g. {0.5 if ratio < 0.375 else 0.25}"


def parse_layers(text: str | None) -> list[int] | str:
    """`0,1,29` -> [0, 1, 29]; `auto` and `auto:N` pass through as text (checked by the split's options)."""
    from moeify.errors import UsageError

    if not text:
        return []
    if text.strip().startswith("auto"):
        return text.strip()
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--dense-layers {text!r} is not a comma-separated list of integers",
                         "e.g. --dense-layers 0,1,29") from None
