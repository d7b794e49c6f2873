"""`moeify finetune MOE_DIR --teacher DENSE --data TEXT --tokens 2M -o OUT` (also under `accelerate launch`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moeify.cli.common import DirArg, JsonOpt, OutputOpt, OverwriteOpt, QuietOpt, cli_command
from moeify.cli.console import Output


@cli_command(rank_zero_only=True)
def finetune(
    out: Output,
    moe_dir: DirArg,
    output: OutputOpt,
    teacher: Annotated[str | None, typer.Option("--teacher", help="The dense model it was split from (folder, "
                                                "Hub id or .gguf; default: the source in moeify.json).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Text file, folder of texts or hf:DATASET (default: "
                                             "the shipped calibration text).")] = None,
    tokens: Annotated[str | None, typer.Option("--tokens", help="Stage-2 token budget, e.g. 2M, 500k.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stage-2 steps (instead of --tokens).")]
    = None,
    stage: Annotated[str, typer.Option("--stage", help="1 (fit routers), 2 (distil), both, or auto: both after a "
                                       "data-free split, 2 after a calibrated one.")] = "auto",
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-4,
    warmup: Annotated[int | None, typer.Option("--warmup", help="Warmup steps (default 5% of the steps), then "
                                               "cosine decay.")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per packed sequence.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step and process.")] = 8,
    lora: Annotated[int, typer.Option("--lora", help="Train experts through LoRA of this rank (0: fully); "
                                      "merged into the output.")] = 0,
    attention_lora: Annotated[bool, typer.Option("--attention-lora", help="Also train attention via LoRA.")]
    = False,
    balance_coef: Annotated[float, typer.Option("--balance-coef", help="Weight of the load-balancing term.")]
    = 0.01,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute "
                                                         "activations to save memory (on CPU also returns "
                                                         "freed blocks to the OS; about 25% slower).")] = False,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save a resumable checkpoint "
                                                  "(OUT.ckpt) every N steps.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.ckpt.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    log_file: Annotated[Path | None, typer.Option("--log-file", help="Write the loss curve as JSON lines.")]
    = None,
    calibration_tokens: Annotated[int, typer.Option("--calibration-tokens", help="Stage-1 tokens.")] = 16384,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (data order).")] = 0,
    experts_forward: Annotated[str, typer.Option("--experts-forward", help="Stage 2's experts computation: "
                                                 "masked (all experts as one masked dense FFN), stock "
                                                 "(transformers'), or auto (masked from top-8 up).")]
    = "auto",
    overwrite: OverwriteOpt = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Repair a split MoE: fit routers layer by layer, then distil it from the dense model."""
    from moeify.finetune import FinetuneOptions
    from moeify.finetune import finetune as run
    from moeify.finetune.data import parse_token_count

    options = FinetuneOptions(
        teacher=teacher, data=data, tokens=parse_token_count(tokens) if tokens is not None else None,
        max_steps=max_steps, stage=stage, lr=lr, warmup=warmup, seq_len=seq_len, batch_size=batch_size,
        lora=lora, attention_lora=attention_lora, balance_coef=balance_coef,
        gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every, resume=resume,
        device=device, log_file=str(log_file) if log_file else None, seed=seed,
        calibration_tokens=calibration_tokens, experts_forward=experts_forward)
    result = run(moe_dir, output, options, overwrite=overwrite, reporter=out)  # Ctrl-C: TrainingInterrupted
    stage1 = result.get("stage1") or {}
    rows = [("output", result["output"]), ("stage", result["stage"]), ("device", result["device"])]
    if stage1:
        rows.append(("router error (mean rel.)", f"{stage1['mean_error_before']:.4f} -> "
                                                 f"{stage1['mean_error_after']:.4f}"))
    if "steps" in result:
        rows += [("steps / tokens", f"{result['steps']} / {result['tokens']}"),
                 ("KL first -> last", f"{result['first_loss']:.4f} -> {result['final_loss']:.4f}"),
                 ("tokens/s", result["tokens_per_s"])]
        if result.get("load_summary"):
            s = result["load_summary"]
            rows.append(("expert load vs uniform", f"{s['min_load_vs_uniform']:.2f} .. "
                                                   f"{s['max_load_vs_uniform']:.2f}"))
    rows.append(("time", f"{result['timings_s']['total']:.1f} s"))
    out.result({k: v for k, v in result.items() if k != "losses"}, title="finetune", rows=rows)
