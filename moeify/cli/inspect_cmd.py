"""`moeify inspect PATH`."""

from __future__ import annotations

from moeify.cli.common import DirArg, JsonOpt, QuietOpt, cli_command
from moeify.cli.console import Output
from moeify.describe import describe


@cli_command
def inspect_(out: Output, path: DirArg, json_mode: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Describe a checkpoint: family, sizes, parameters; experts and activation ratio for an MoE."""
    info = describe(path)
    rows = [(k, v) for k, v in info.items() if v is not None and k != "path"]
    for i, (k, v) in enumerate(rows):
        if isinstance(v, float):
            rows[i] = (k, f"{v:.1%}" if "ratio" in k else f"{v:.2f}x" if k.endswith("_vs_dense") else f"{v:.4g}")
        elif isinstance(v, int) and v > 10_000:
            rows[i] = (k, f"{v:,}")
        elif isinstance(v, list | dict):
            rows[i] = (k, ", ".join(map(str, v)) if isinstance(v, list) else
                       ", ".join(f"{a}={b}" for a, b in v.items()))
    out.result(info, title=str(path), rows=rows)
