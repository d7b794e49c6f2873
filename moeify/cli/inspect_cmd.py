"""`moeify inspect PATH`."""

from __future__ import annotations

from moeify.cli import app
from moeify.cli.common import DirArg, JsonOpt, QuietOpt, run_command
from moeify.cli.console import Output
from moeify.describe import describe


@app.command("inspect")
def inspect_(path: DirArg, json_mode: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Describe a checkpoint: family, sizes, parameters; experts and activation ratio for an MoE."""
    out = Output(json_mode, quiet)

    def body():
        info = describe(path)
        rows = [(k, v) for k, v in info.items() if v is not None and k != "path"]
        for i, (k, v) in enumerate(rows):
            if isinstance(v, float):
                rows[i] = (k, f"{v:.1%}" if "ratio" in k else f"{v:.4g}")
            elif isinstance(v, int) and v > 10_000:
                rows[i] = (k, f"{v:,}")
            elif isinstance(v, list | dict):
                rows[i] = (k, ", ".join(map(str, v)) if isinstance(v, list) else
                           ", ".join(f"{a}={b}" for a, b in v.items()))
        out.result(info, title=str(path), rows=rows)

    run_command(out, body)
