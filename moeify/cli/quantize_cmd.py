"""`moeify quantize DIR [--fp8] -o OUT` and `moeify dequantize DIR -o OUT`."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer
from rich.table import Table

from moeify.cli.common import DirArg, JsonOpt, OutputOpt, OverwriteOpt, QuietOpt, cli_command
from moeify.cli.console import Output


class SchemeChoice(str, Enum):
    auto = "auto"
    block = "block"
    channel = "channel"
    tensor = "tensor"


@cli_command
def quantize_command(
    out: Output,
    folder: DirArg,
    output: OutputOpt,
    fp8: Annotated[bool, typer.Option("--fp8", help="Quantize to FP8 e4m3 (the only format, so the default; "
                                      "the flag is kept for scripts).")] = True,
    scheme: Annotated[SchemeChoice, typer.Option(
        "--scheme", help="block: 128x128 scales (DeepSeek-V3 layout); channel: one scale per output row "
        "(compressed-tensors FP8_DYNAMIC); tensor: one scale per matrix; auto: block when every quantized "
        "dimension is a multiple of 128, else channel.", case_sensitive=False)] = SchemeChoice.auto,
    experts_only: Annotated[bool, typer.Option("--experts-only", help="Keep attention in its source dtype; "
                                               "quantize only MLP/expert projections.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip re-reading the output to measure the "
                                            "dequantization error.")] = False,
    tensor_parallel: Annotated[int, typer.Option("--tensor-parallel", help="GPUs vLLM will shard it over: block "
                                                 "scales need each rank's expert slice in whole 128-wide blocks "
                                                 "(checked before any work).")] = 1,
    overwrite: OverwriteOpt = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Quantize a checkpoint's attention and MLP/expert weights to FP8 with float32 scales.

    Embeddings, lm_head, norms, routers and shared-expert gates stay in their source dtype. Works
    tensor by tensor from disk to disk, so memory stays small whatever the model size.
    """
    from moeify.quant.quantize import quantize_fp8

    del fp8  # FP8 is the only format: the flag stays for scripts that pass it
    result = quantize_fp8(folder, output, scheme=scheme.value, experts_only=experts_only,
                          verify=not no_verify, overwrite=overwrite, reporter=out, tensor_parallel=tensor_parallel)
    data = result.summary()
    p = result.plan
    rows = [("output", str(output)), ("scheme", p.scheme), ("why", p.scheme_reason),
            ("quantized", ", ".join(f"{n} {k}" for k, n in sorted(p.kinds().items()))),
            ("kept", f"{len(p.kept)} tensors ({len(p.unquantized_modules)} Linear-like modules)"),
            ("size", f"{_mb(p.source_bytes)} -> {_mb(p.output_bytes)}"),
            ("quantized tensors", _quantized_share(p, data["quantized_bytes_vs_bf16"])),
            ("time", f"{result.seconds:.1f} s")]
    tables = []
    if result.verify is not None:
        t = Table("kind", "worst relative error", "tensor", title="verification (re-read from disk)",
                  box=None, pad_edge=False)
        for kind, (error, name) in sorted(result.verify.worst_by_kind.items()):
            t.add_row(kind, f"{error:.4f}", name)
        tables.append(t)
        rows.append(("kept bit-identical", result.verify.kept_identical))
    out.result(data, title="quantized", rows=rows, tables=tables)


@cli_command
def dequantize_command(
    out: Output,
    folder: DirArg,
    output: OutputOpt,
    overwrite: OverwriteOpt = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write an FP8 checkpoint back as bf16 (for debugging, or tools that cannot read FP8)."""
    from moeify.quant.dequantize import dequantize_checkpoint

    result = dequantize_checkpoint(folder, output, overwrite=overwrite, reporter=out)
    out.result(result.summary(), title="dequantized")


def _quantized_share(plan, vs_bf16: float) -> str:
    """The quantized tensors' size against their source dtype, and against bf16 only when that is not the same.

    "vs bf16" alone read as if the source were bf16; for a float32 source FP8 is about a quarter of it.
    """
    dtypes = sorted({str(t.source_dtype).removeprefix("torch.") for t in plan.targets.values()})
    vs_source = plan.quantized_output_bytes / max(1, plan.quantized_source_bytes)
    text = f"{vs_source:.1%} of their {'/'.join(dtypes) or 'source'} size"
    return text if dtypes == ["bfloat16"] else f"{text} ({vs_bf16:.1%} of bf16)"


def _mb(n: int) -> str:
    return f"{n / 1024**2:.1f} MB"
