"""`finetune()`: stage 1 (router fitting) and stage 2 (distillation), then a standard checkpoint out.

The order is the house order: validate options and inputs, resolve the teacher and the data, check the
output path — all before the first weight is trained — then train, then write the output atomically
with the input's exact tensor layout and a moeify.json that records the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moeify.arch.consistency import check_checkpoint
from moeify.arch.names import is_expert_parameter, is_router_parameter
from moeify.device import return_freed_blocks_promptly
from moeify.errors import InputError, UsageError
from moeify.finetune.data import BatchPlan, load_chunks, steps_for
from moeify.finetune.distill import DistillConfig, distill
from moeify.finetune.moe_model import MOE_TYPES, load_student, moe_blocks
from moeify.finetune.state import checkpoint_dir, read_state
from moeify.io.output import atomic_output, check_output_path
from moeify.io.reader import CheckpointReader, load_json
from moeify.metadata import hardware, read_metadata, write_metadata
from moeify.progress import SILENT, Reporter
from moeify.source import copy_side_files, resolve_source

STAGES = ("auto", "1", "2", "both")
DEVICES = ("auto", "cpu", "cuda")
EXPERTS_FORWARDS = ("auto", "masked", "stock")
MASKED_MIN_TOP_K = 8  # auto uses the masked forward from top-8 up (docs/finetune.md: wins at 16, loses at 2 and 4)
CONFIG_FILES = ("config.json", "generation_config.json")
MIN_USEFUL_STEPS = 20  # fewer stage-2 steps than this get a warning that the budget is too small
SUGGESTED_STEPS = 100


@dataclass
class FinetuneOptions:
    """Everything that decides a fine-tuning run; recorded verbatim in moeify.json."""

    teacher: str | None = None  # dense model (folder, Hub id, .gguf); default: the split's recorded source
    data: str | None = None  # text file, folder or hf:DATASET; default: the shipped calibration text
    tokens: int | None = None  # stage-2 token budget (or max_steps)
    max_steps: int | None = None
    stage: str = "auto"  # "1" routers only, "2" distillation only, "both", or "auto" (see resolve_stage)
    lr: float = 1e-4
    warmup: int | None = None  # warmup steps; default 5% of the steps
    seq_len: int = 512
    batch_size: int = 8  # sequences per step and process
    lora: int = 0  # LoRA rank for the experts (0: train them fully)
    attention_lora: bool = False
    balance_coef: float = 0.01
    router_scale_lr: float = 1e-2
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: only on Ctrl-C)
    resume: bool = False
    device: str = "auto"
    log_file: str | None = None
    seed: int = 0
    calibration_tokens: int = 16384  # stage-1 tokens (taken from the start of the data)
    router_steps: int = 200  # stage-1 optimisation steps per layer
    experts_forward: str = "auto"  # stage 2: "masked" (one dense masked FFN), "stock" (transformers'), "auto"


def validate_options(o: FinetuneOptions) -> None:
    if o.stage not in STAGES:
        raise UsageError(f"--stage {o.stage!r} is not one of {', '.join(STAGES)}", "e.g. --stage both")
    if o.device not in DEVICES:
        raise UsageError(f"--device {o.device!r} is not one of {', '.join(DEVICES)}", "e.g. --device auto")
    if o.stage != "1" and o.tokens is None and o.max_steps is None:
        raise UsageError("stage 2 needs a training budget", "--tokens 2M or --max-steps N")
    checks = [("--seq-len", o.seq_len, 2), ("--batch-size", o.batch_size, 1), ("--lora", o.lora, 0),
              ("--checkpoint-every", o.checkpoint_every, 0), ("--calibration-tokens", o.calibration_tokens, 1),
              ("--router-steps", o.router_steps, 0)]
    for flag, value, minimum in checks:
        if value < minimum:
            raise UsageError(f"{flag} must be at least {minimum} (got {value})", f"e.g. {flag} {max(minimum, 8)}")
    finite = all(math.isfinite(v) for v in (o.lr, o.router_scale_lr, o.balance_coef))
    if not finite or not o.lr > 0 or not o.router_scale_lr >= 0 or not o.balance_coef >= 0:
        raise UsageError("--lr must be positive and --balance-coef non-negative (finite numbers)", "e.g. --lr 1e-4")
    if o.experts_forward not in EXPERTS_FORWARDS:
        raise UsageError(f"--experts-forward {o.experts_forward!r} is not one of {', '.join(EXPERTS_FORWARDS)}",
                         "e.g. --experts-forward auto")
    if o.warmup is not None and o.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more (got {o.warmup})", "e.g. --warmup 20")


def pick_device(requested: str) -> str:
    """"cpu" or "cuda", resolved as every command resolves --device (moeify.device)."""
    from moeify.device import resolve_device

    return resolve_device(requested).type


def make_accelerator(device: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Experts a batch never routes to get no gradient; DDP must not wait for them.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=device == "cpu", mixed_precision="no", kwargs_handlers=[ddp])


def resolve_stage(requested: str, moe_dir: Path) -> tuple[str, str | None]:
    """The stages to run, and a note when "auto" skipped stage 1.

    Stage 1 fits routers to the dense teacher's per-layer outputs. After a data-driven split (whose routers
    and repaired experts were fitted together, with error compensation) it made perplexity worse every time
    it was measured on SmolLM2 (8 top-2: 131.5 -> 145.6 in domain, 1753 -> 8027 out of domain; an older
    split 321.8 -> 350.2), while after the data-free `weights` split it helps (1.37M -> 191k). So "auto"
    runs it only when the split was data-free (or unrecorded).
    """
    if requested != "auto":
        return requested, None
    split = read_metadata(moe_dir)["stages"].get("split") or {}
    method = (split.get("options") or {}).get("method")
    fallback = (split.get("method_info") or {}).get("fallback")
    if method and method != "weights" and not fallback:
        return "2", (f"skipping stage 1: the {method} split already fitted its routers on data, and stage 1 "
                     "measured worse after it (--stage both forces it)")
    return "both", None


def teacher_spec(moe_dir: Path, requested: str | None) -> str:
    if requested:
        return requested
    source = ((read_metadata(moe_dir)["stages"].get("split") or {}).get("source") or {})
    ident = source.get("id")
    if not isinstance(ident, str) or not ident:
        raise UsageError(f"{moe_dir}: no --teacher given and moeify.json names no source model",
                         "pass --teacher DENSE_MODEL (the model the MoE was split from)")
    return ident


def load_teacher(folder: Path, device: str):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                 trust_remote_code=False)
    model.config.use_cache = False
    return model.eval().requires_grad_(False)


def pick_experts_forward(model: torch.nn.Module, requested: str) -> str:
    """Install the masked experts forward when asked, or (auto) for many active experts per token.

    transformers' grouped forward copies every token once per chosen expert, so its cost grows with top_k,
    while the masked forward always costs one dense FFN: on SmolLM2 splits (CPU, bench/finetune_step.py)
    the masked one was about 2x faster at top-16 of 48 and 15-20% slower at top-4 of 28 and top-2 of 8.
    Returns what the run uses.
    """
    from moeify.finetune.masked_experts import use_masked_experts

    top_k = getattr(model.config, "num_experts_per_tok", 1) or 1
    if pick_masked(top_k, requested):
        if use_masked_experts(model):
            return "masked"
    return "stock"


def set_trainable(model: torch.nn.Module) -> int:
    """Routers and experts (routed and shared) train; attention, norms, embeddings and the shared
    expert's gate stay frozen (the gate at its split value keeps the shared expert always on)."""
    count = 0
    for name, p in model.named_parameters():
        train = is_router_parameter(name) or is_expert_parameter(name)
        p.requires_grad_(train)
        count += p.numel() if train else 0
    return count


def data_fingerprint(chunks: torch.Tensor) -> str:
    return hashlib.sha256(chunks.numpy().tobytes()).hexdigest()[:16]


@dataclass
class RunPlan:
    """What a run will do, settled before the first weight moves: the data, the steps, what a resume must match."""

    stage: str
    device: str
    world: int
    chunks: torch.Tensor
    data_label: str
    steps: int
    warmup: int
    resume_options: dict[str, Any]
    checkpoint: Path
    resume_state: dict[str, Any] | None

    @property
    def seq_len(self) -> int:
        return int(self.chunks.shape[1])


def finetune(moe_dir: str | Path, output: str | Path, options: FinetuneOptions | None = None, *,
             overwrite: bool = False, reporter: Reporter = SILENT, chunks: torch.Tensor | None = None,
             accelerator=None) -> dict[str, Any]:
    """Repair the MoE at `moe_dir` and write it to `output`; returns the record written to moeify.json.

    `chunks` ([n, seq_len] token ids) replaces `options.data` (tests, or callers with their own tokens).
    """
    options = options or FinetuneOptions()
    validate_options(options)
    started = time.perf_counter()
    moe_dir, output = Path(moe_dir), Path(output)
    config = _check_input(moe_dir)
    check_output_path(output, [moe_dir], overwrite)
    stage, stage_note = resolve_stage(options.stage, moe_dir)
    if stage_note:
        reporter.note(stage_note)
    teacher_source = _resolve_teacher(moe_dir, options, config, reporter)
    device = pick_device(options.device)
    accelerator = accelerator or make_accelerator(device)
    # The output is claimed before the first weight is trained: a second run to the same -o fails here, in
    # seconds, instead of after the whole training; the lock also guards OUT.ckpt (see _claim_output).
    with _claim_output(output, overwrite, accelerator, reporter) as tmp:
        plan = _plan(moe_dir, output, options, chunks, stage, device, accelerator)
        _announce_plan(plan, options, reporter)
        reporter.status(f"loading {moe_dir.name} and the teacher {teacher_source.id}")
        torch.manual_seed(options.seed)
        student = load_student(moe_dir)
        record: dict[str, Any] = {
            "input": str(moe_dir), "teacher": teacher_source.describe(), "options": asdict(options),
            "data": plan.data_label, "seq_len": plan.seq_len, "stage": stage, "device": device,
            "processes": plan.world,
        }
        timings: dict[str, float] = {}
        if stage in ("1", "both") and plan.resume_state is None:
            tick = time.perf_counter()
            record["stage1"] = _run_stage1(student, moe_dir, teacher_source.folder, plan, options, reporter)
            timings["stage1"] = round(time.perf_counter() - tick, 2)
        elif plan.resume_state is not None:
            record["stage1"] = (plan.resume_state.get("options") or {}).get("stage1")
        if stage in ("2", "both"):
            tick = time.perf_counter()
            student = _run_stage2(student, teacher_source.folder, plan, options, accelerator, record, reporter)
            timings["stage2"] = round(time.perf_counter() - tick, 2)
        student = student.to("cpu")
        _refuse_diverged(student)
        _record_final_weights(student, plan.world, record, reporter)
        timings["total"] = round(time.perf_counter() - started, 2)
        record["timings_s"] = timings
        if tmp is not None:
            reporter.status(f"writing {output}")
            _write_output(student, moe_dir, tmp, record)
    if accelerator.is_main_process:
        shutil.rmtree(plan.checkpoint, ignore_errors=True)  # only once the output is in place
    accelerator.wait_for_everyone()
    return {"output": str(output), **record}


def _check_input(moe_dir: Path) -> dict[str, Any]:
    if not (moe_dir / "config.json").is_file():
        raise InputError(f"{moe_dir}: no config.json here", "give the output folder of `moeify split`")
    config = load_json(moe_dir / "config.json", "config.json")
    if config.get("model_type") not in MOE_TYPES:
        raise InputError(f"{moe_dir}: model_type {config.get('model_type')!r} is not an MoE moeify fine-tunes",
                         f"give the output of `moeify split` ({', '.join(MOE_TYPES)})")
    check_checkpoint(CheckpointReader(moe_dir), config)
    return config


def _resolve_teacher(moe_dir: Path, options: FinetuneOptions, config: dict[str, Any], reporter: Reporter):
    teacher_source = resolve_source(teacher_spec(moe_dir, options.teacher), reporter=reporter)
    teacher_config = load_json(teacher_source.folder / "config.json", "config.json")
    check_checkpoint(CheckpointReader(teacher_source.folder), teacher_config)
    if teacher_config.get("vocab_size") != config.get("vocab_size"):
        raise InputError(f"the teacher's vocabulary ({teacher_config.get('vocab_size')}) differs from the MoE's "
                         f"({config.get('vocab_size')})", "use the dense model the MoE was split from")
    return teacher_source


def _plan(moe_dir: Path, output: Path, options: FinetuneOptions, chunks: torch.Tensor | None, stage: str,
          device: str, accelerator) -> RunPlan:
    """Tokens, steps, warmup and the options a resume must match (and the saved state when resuming)."""
    data_label = "<token ids from the caller>" if chunks is not None else (options.data or "<shipped calibration text>")
    if chunks is None:
        from moeify.data import load_tokenizer

        chunks = load_chunks(options.data, load_tokenizer(moe_dir), options.seq_len)
    chunks = chunks.long()
    seq_len = chunks.shape[1]
    world = accelerator.num_processes
    steps = 0 if stage == "1" else steps_for(options.tokens, options.max_steps, seq_len, options.batch_size * world)
    warmup = options.warmup if options.warmup is not None else max(0, round(0.05 * steps))
    resume_options = {"seed": options.seed, "lr": options.lr, "warmup": warmup, "seq_len": seq_len,
                      "batch_size": options.batch_size, "steps": steps, "lora": options.lora,
                      "attention_lora": options.attention_lora, "balance_coef": options.balance_coef,
                      "data_fingerprint": data_fingerprint(chunks), "world": world}
    ckpt = checkpoint_dir(output)
    return RunPlan(stage=stage, device=device, world=world, chunks=chunks, data_label=data_label, steps=steps,
                   warmup=warmup, resume_options=resume_options, checkpoint=ckpt,
                   resume_state=read_state(ckpt) if options.resume else None)


def _announce_plan(plan: RunPlan, options: FinetuneOptions, reporter: Reporter) -> None:
    """Say what the budget buys before the long wait, and warn when it is too small to change anything.

    With 4096 tokens at the default 8 x 512 per step, a run is a single step: its KL is measured before the
    update, so "first -> last" cannot move and the run only costs the loading time.
    """
    if plan.stage == "1":
        return
    batch = options.batch_size * plan.world
    tokens = plan.steps * batch * plan.seq_len
    reporter.note(f"plan: {plan.steps} step{'s' if plan.steps != 1 else ''} of {batch} x {plan.seq_len} tokens "
                  f"({tokens:,} tokens), warmup {plan.warmup}")
    if plan.steps < MIN_USEFUL_STEPS:
        suggest = _token_count(SUGGESTED_STEPS * batch * plan.seq_len)
        reporter.note(f"warning: {plan.steps} step{'s' if plan.steps != 1 else ''} will barely move the model "
                      f"(the KL is measured before each update); for ~{SUGGESTED_STEPS} steps pass --tokens "
                      f"{suggest} or --max-steps {SUGGESTED_STEPS}")


def estimate_memory(student: torch.nn.Module, options: FinetuneOptions, device: str, seq_len: int) -> dict[str, int]:
    """A rough peak of stage 2 in bytes, by part (host RAM on CPU, GPU memory on CUDA).

    Float32 master weights for the student; the teacher at its training dtype; float32 gradients and two
    AdamW moments for the trainable parameters; activations kept for the backward pass (only each layer's
    input with --gradient-checkpointing, plus one layer being recomputed); one chunk of the loss's logits;
    and about half a GB of runtime (torch, the tokenizer, Python) on CPU. Printed before training so a run
    that cannot fit says so in seconds; docs/finetune.md compares it with measured peaks.
    """
    cfg = student.config
    params = sum(p.numel() for p in student.parameters())
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    hidden, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    experts, top_k = getattr(cfg, "num_local_experts", None) or cfg.num_experts, cfg.num_experts_per_tok
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    shared = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
    masked = pick_masked(top_k, options.experts_forward)
    per_token_layer = 12 * hidden + 5 * (experts if masked else top_k) * width + 4 * shared  # float32 values
    tokens = options.batch_size * seq_len
    if options.gradient_checkpointing:
        activations = 4 * tokens * (layers * hidden + per_token_layer)
    else:
        activations = 4 * tokens * layers * per_token_layer
    from moeify.finetune.distill import KL_CHUNK_TOKENS

    parts = {"student": 4 * params, "teacher": (2 if device == "cuda" else 4) * params,
             "gradients_and_adam": 12 * trainable, "activations": activations,
             "loss": 4 * (4 * KL_CHUNK_TOKENS * vocab + 3 * tokens * hidden),
             "runtime": 0 if device == "cuda" else 512 * 2**20}
    parts["total"] = sum(parts.values())
    return parts


def pick_masked(top_k: int, requested: str) -> bool:
    return requested == "masked" or (requested == "auto" and top_k >= MASKED_MIN_TOP_K)


def _run_stage1(student: torch.nn.Module, moe_dir: Path, teacher_folder: Path, plan: RunPlan,
                options: FinetuneOptions, reporter: Reporter) -> dict[str, Any]:
    from moeify.finetune.routers import fit_routers

    calib = plan.chunks[: max(1, options.calibration_tokens // plan.seq_len)]
    fits = fit_routers(student, teacher_folder, calib, _split_router_scale(moe_dir), steps=options.router_steps,
                       seed=options.seed, reporter=reporter)
    return {"calibration_tokens": int(calib.numel()), "layers": fits,
            "mean_error_before": _mean(f["error_before"] for f in fits),
            "mean_error_after": _mean(f["error_after"] for f in fits)}


def _run_stage2(student: torch.nn.Module, teacher_folder: Path, plan: RunPlan, options: FinetuneOptions,
                accelerator, record: dict[str, Any], reporter: Reporter) -> torch.nn.Module:
    """Distil the student from the teacher; fills `record` with the curve and the figures of the run."""
    set_trainable(student)
    record["experts_forward"] = pick_experts_forward(student, options.experts_forward)
    record["memory_estimate_bytes"] = _announce_memory(student, options, plan, reporter)
    teacher = load_teacher(teacher_folder, plan.device)
    if options.lora or options.attention_lora:
        from moeify.finetune.lora import add_lora

        student = add_lora(student, options.lora, options.attention_lora)
    if options.gradient_checkpointing:
        set_checkpointing(student, True)
        if torch.device(plan.device).type == "cpu" and return_freed_blocks_promptly():
            record["cpu_allocator"] = "blocks of 1 MiB and more from mmap (returned to the OS when freed)"
    cfg = DistillConfig(steps=plan.steps, lr=options.lr, warmup=plan.warmup, batch_size=options.batch_size,
                        balance_coef=options.balance_coef, router_scale_lr=options.router_scale_lr,
                        checkpoint_every=options.checkpoint_every, seed=options.seed)
    plan.resume_options["stage1"] = record.get("stage1")
    student, result = distill(student, teacher, plan.chunks, cfg, accelerator, checkpoint=plan.checkpoint,
                              resume=plan.resume_state is not None, resume_options=plan.resume_options,
                              log_file=Path(options.log_file) if options.log_file else None, reporter=reporter,
                              on_step=_time_estimate(plan.steps, reporter))
    if options.lora or options.attention_lora:
        from moeify.finetune.lora import merge_lora

        student = merge_lora(student)
    if options.gradient_checkpointing:
        set_checkpointing(student, False)
    del teacher
    batch_tokens = BatchPlan(plan.chunks.shape[0], options.batch_size, options.seed, plan.world).global_batch
    record.update(tokens=result.tokens, steps=result.steps, first_loss=result.first_loss,
                  final_loss=result.final_loss, tokens_per_s=result.tokens_per_s,
                  resumed_from=result.resumed_from, peak_gpu_memory_bytes=result.peak_memory_bytes,
                  expert_load=result.expert_load, load_summary=_load_summary(result.expert_load),
                  losses=result.losses, warmup=plan.warmup, batch_tokens=batch_tokens * plan.seq_len)
    return student


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant, so frozen inputs work).

    transformers 5 renamed `gradient_checkpointing_*` to `activation_checkpointing_*` and warns on the old
    names; older releases have only the old ones.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _announce_memory(student: torch.nn.Module, options: FinetuneOptions, plan: RunPlan,
                     reporter: Reporter) -> dict[str, int]:
    memory = estimate_memory(student, options, plan.device, plan.seq_len)
    where = "GPU memory" if plan.device == "cuda" else "RAM"
    hint = ""
    if not options.gradient_checkpointing:
        saving = estimate_memory(student, replace(options, gradient_checkpointing=True), plan.device, plan.seq_len)
        hint = f" ({_gb(saving['total'])} with --gradient-checkpointing)"
    reporter.note(f"estimated peak {where}: {_gb(memory['total'])}{hint}; the time is estimated after two steps")
    available = _memory_available(plan.device)
    if available is not None and memory["total"] > available:
        reporter.note(f"warning: that is more than this machine's {_gb(available)}; pass --gradient-checkpointing "
                      "or a smaller --batch-size")
    return memory


def _memory_available(device: str) -> int | None:
    """Total RAM (CPU) or the GPU's memory, for the warning that a run will not fit; None when unknown."""
    try:
        if device == "cuda":
            return int(torch.cuda.get_device_properties(0).total_memory)
        import os

        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


def _time_estimate(steps: int, reporter: Reporter):
    """An on_step callback: after the second step (the first warms up allocators and threads), one note with
    the time the remaining steps will take at the measured rate."""
    seen = {"n": 0}

    def on_step(step: int, entry: dict[str, Any]) -> None:
        seen["n"] += 1
        if seen["n"] == min(2, steps) and step < steps:
            rate = entry["tokens_per_s"]
            left = (steps - step) * entry["tokens"] / step / max(rate, 1e-9)
            reporter.note(f"at {rate:.0f} tokens/s the remaining {steps - step} steps take about {_duration(left)}")

    return on_step


def _refuse_diverged(student: torch.nn.Module) -> None:
    diverged = next((n for n, p in student.named_parameters() if not torch.isfinite(p).all()), None)
    if diverged is not None:  # never publish NaN weights as a finished model
        raise UsageError(f"training diverged: {diverged} holds NaN or inf values; nothing was written",
                         "lower --lr (e.g. --lr 1e-4) or --balance-coef and run again")


def _record_final_weights(student: torch.nn.Module, world: int, record: dict[str, Any], reporter: Reporter) -> None:
    digests = [weights_digest(student)]
    if world > 1:
        from accelerate.utils import gather_object

        digests = gather_object(digests)
    record["process_weight_digests"] = digests  # every process must end with the same weights
    if len(set(digests)) > 1:
        reporter.note(f"the {world} processes ended with different weights; only process 0's are written")
    record["router_scales"] = _router_scales(student)
    record["hardware"] = hardware()


def _write_output(student: torch.nn.Module, moe_dir: Path, tmp: Path, record: dict[str, Any]) -> None:
    from moeify.finetune.export import write_like_input

    write_like_input(student, moe_dir, tmp)
    for name in CONFIG_FILES:
        if (moe_dir / name).is_file():
            shutil.copyfile(moe_dir / name, tmp / name)
    record["copied_files"] = copy_side_files(moe_dir, tmp)
    write_metadata(tmp, "finetune", record, read_metadata(moe_dir))


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _token_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n / 1e3:.0f}k"


@contextlib.contextmanager
def _claim_output(output: Path, overwrite: bool, accelerator, reporter: Reporter) -> Iterator[Path | None]:
    """The output's lock and temporary folder for the whole run, not just the export.

    Two runs to the same -o would otherwise both train (and share OUT.ckpt) and the second would fail only at
    the end. Only the main process writes, so it alone takes the lock; the others get None. Ctrl-C or an error
    releases the lock and leaves OUT.ckpt for --resume.
    """
    if not accelerator.is_main_process:
        yield None
        return
    with atomic_output(output, overwrite,
                       on_stale=lambda p: reporter.note(f"removed {p.name}, left by a killed run")) as tmp:
        yield tmp


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of every parameter's bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _split_router_scale(moe_dir: Path) -> float:
    from moeify.finetune.moe_model import DEFAULT_ROUTER_SCALE

    std = ((read_metadata(moe_dir)["stages"].get("split") or {}).get("options") or {}).get("router_logit_std")
    return float(std) if isinstance(std, int | float) and 0 < std <= 1 else DEFAULT_ROUTER_SCALE


def _router_scales(model: torch.nn.Module) -> list[float | None]:
    scales: list[float | None] = [None] * model.config.num_hidden_layers
    for block in moe_blocks(model):
        scales[block.layer] = float(f"{block.router.log_scale.exp().item():.6g}")
    return scales


def _load_summary(loads: list[list[float]]) -> dict[str, float] | None:
    if not loads:
        return None
    flat = [x for row in loads for x in row]
    experts = len(loads[0])
    return {"max_load_vs_uniform": round(max(flat) * experts, 3), "min_load_vs_uniform": round(min(flat) * experts, 3)}


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 6) if values else None

