"""Stage 2: end-to-end distillation of the MoE toward the dense teacher's next-token distributions.

The loss is KL(teacher || student) per token plus a Switch-style load-balancing term over the routers'
choices. Precision follows DeepSeek's recipe: master weights and Adam moments stay float32, the forward
pass runs under bf16 autocast on CUDA, and the routers compute in float32 always (see moe_model.py).
Everything goes through `accelerate`, so one process on a CPU, one GPU, or `accelerate launch` on many
(DDP) run this same code; each process trains on its own slice of every global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeify.finetune.data import BatchPlan
from moeify.finetune.moe_model import moe_blocks
from moeify.finetune.state import TrainingInterrupted, check_resumable, load_checkpoint, save_checkpoint
from moeify.progress import SILENT, Reporter

MIN_LR_FRACTION = 0.1
KL_CHUNK_TOKENS = 256  # tokens per slice of the vocabulary projection in the loss (50 MB of float32 logits each)


@dataclass
class DistillConfig:
    steps: int
    lr: float = 1e-4
    warmup: int = 0
    batch_size: int = 8
    balance_coef: float = 0.01
    router_scale_lr: float = 1e-2
    grad_clip: float = 1.0
    checkpoint_every: int = 0
    seed: int = 0


@dataclass
class DistillResult:
    steps: int
    tokens: int
    first_loss: float | None
    final_loss: float | None
    losses: list[dict[str, Any]] = field(default_factory=list)  # the (thinned) curve for moeify.json
    expert_load: list[list[float]] = field(default_factory=list)  # per MoE layer, fraction per expert
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    resumed_from: int | None = None
    peak_memory_bytes: int | None = None


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to MIN_LR_FRACTION at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in float32."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


class _ChunkedKL(torch.autograd.Function):
    """KL(teacher || student) from both models' final hidden states, projected to the vocabulary in chunks.

    Why: full logits for a batch of 4 x 512 tokens over SmolLM2's 49k vocabulary are 400 MB per float32 copy,
    and the plain loss keeps about six such copies alive at once (both models' logits, their float32
    log-softmaxes, the product, and the student's logit gradient in the backward pass): over 2 GB at batch
    4, twice that at the default batch 8. Here only one chunk of `chunk` tokens is ever projected, and the
    gradient with respect to the student's hidden states is computed in the same pass (the output head is
    frozen, so it needs no gradient), so nothing is recomputed: the arithmetic is that of the plain loss.
    """

    @staticmethod
    def forward(ctx, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: torch.Tensor,
                teacher_head: torch.Tensor, chunk: int) -> torch.Tensor:
        hs = student_hidden.reshape(-1, student_hidden.shape[-1])
        ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        n = hs.shape[0]
        grad = torch.empty_like(hs) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=hs.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            t = F.log_softmax(F.linear(ht[rows], teacher_head).float(), dim=-1)
            s = F.log_softmax(F.linear(hs[rows], student_head).float(), dim=-1)
            p = t.exp()
            total += t.sub_(s).mul_(p).sum()  # sum of p_t * (log p_t - log p_s), in place: t is not needed again
            del t
            if grad is not None:  # d/d(student logits) of the token's KL: softmax(student) - p_teacher
                g = s.exp_().sub_(p)
                grad[rows] = (g.to(student_head.dtype) @ student_head).to(grad.dtype)
        ctx.save_for_backward(grad if grad is not None else hs.new_zeros(0))
        ctx.n, ctx.shape = n, student_hidden.shape
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return (grad * (grad_output / ctx.n)).view(ctx.shape), None, None, None, None


def chunked_kl_to_teacher(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: torch.Tensor,
                          teacher_head: torch.Tensor, chunk: int = KL_CHUNK_TOKENS) -> torch.Tensor:
    """`kl_to_teacher(student_hidden @ student_head.T, teacher_hidden @ teacher_head.T)` without ever holding
    the whole logits: the same value and gradient for the student's hidden states, in a fraction of the memory."""
    return _ChunkedKL.apply(student_hidden, teacher_hidden, student_head, teacher_head, chunk)


@contextlib.contextmanager
def hidden_states_as_logits(student: torch.nn.Module, teacher: torch.nn.Module
                            ) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
    """While inside, both models' `.logits` are their final hidden states; yields the two output heads' weights.

    The vocabulary projection then happens in `chunked_kl_to_teacher`. Swapping the head for an identity
    (rather than calling the inner model) keeps the call going through the student's wrapper (DDP, peft), so
    gradient synchronisation and adapters work as before. Yields None, and changes nothing, when a head is
    not a bias-free linear layer or is trained: the loss then takes the plain path.
    """
    models = (student, teacher)
    heads = [m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None for m in models]
    usable = all(isinstance(h, torch.nn.Linear) and h.bias is None and not h.weight.requires_grad for h in heads)
    if not usable:
        yield None
        return
    for m in models:
        m.set_output_embeddings(torch.nn.Identity())
    try:
        yield heads[0].weight, heads[1].weight  # type: ignore[union-attr]
    finally:
        for m, head in zip(models, heads, strict=True):
            m.set_output_embeddings(head)


def balance_loss(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Switch-Transformer load balance E * sum_e f_e * P_e, averaged over layers (1.0 when uniform).

    f_e is the fraction of top-k slots that went to expert e (no gradient), P_e the mean router
    probability: the gradient lowers the probability of overloaded experts. Also returns the counts.
    """
    terms, counts = [], []
    for block in moe_blocks(model):
        logits, chosen = block.router.last_logits, block.router.last_indices
        if logits is None:
            continue
        experts = logits.shape[-1]
        count = torch.bincount(chosen.reshape(-1), minlength=experts).float()
        fraction = count / count.sum()
        terms.append(experts * (fraction * logits.softmax(-1).mean(0)).sum())
        counts.append(count.detach())
    if not terms:
        return torch.zeros(()), counts
    return torch.stack(terms).mean(), counts


def build_optimizer(model: torch.nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    """AdamW in float32; routers in their own groups with epsilon scaled like their gradients.

    A router's gradient is proportional to its temperature exp(log_scale) (1e-5 right after split),
    so its Adam epsilon is scaled by the same factor: the update then equals the one a unit-scale router
    would get. The log temperature has its own, larger learning rate so routing can sharpen in a short run.
    """
    routers = {id(b.router.weight_unit): b.router for b in moe_blocks(model)}
    scales = [r.log_scale.exp().item() for r in routers.values()] or [1.0]
    eps = 1e-8 * min(scales)
    main, units, temps = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in routers:
            units.append(p)
        elif name.endswith("gate.log_scale"):
            temps.append(p)
        else:
            main.append(p)
    groups = [{"params": main, "lr": cfg.lr, "base_lr": cfg.lr},
              {"params": units, "lr": cfg.lr, "base_lr": cfg.lr, "eps": eps},
              {"params": temps, "lr": cfg.router_scale_lr, "base_lr": cfg.router_scale_lr, "eps": eps}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=0.0,
                             betas=(0.9, 0.95), foreach=False)


class _StopFlag:
    """First Ctrl-C asks the loop to stop at the next step boundary (to save cleanly); a second one kills."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def distill(model: torch.nn.Module, teacher: torch.nn.Module, chunks: torch.Tensor, cfg: DistillConfig,
            accelerator, checkpoint: Path | None = None, resume: bool = False,
            resume_options: dict[str, Any] | None = None, log_file: Path | None = None,
            reporter: Reporter = SILENT, on_step: Callable[[int, dict[str, Any]], None] | None = None
            ) -> tuple[torch.nn.Module, DistillResult]:
    """Train `model` (already holding ScaledRouters) for cfg.steps; returns the unwrapped model and stats."""
    torch.manual_seed(cfg.seed)
    device = accelerator.device
    plan = BatchPlan(chunks.shape[0], cfg.batch_size, cfg.seed, accelerator.num_processes)
    seq_len = chunks.shape[1]
    optimizer = build_optimizer(model, cfg)
    log: list[dict[str, Any]] = []
    start = 0
    resumed_from = None
    if resume and checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        check_resumable(state, resume_options or {}, checkpoint)
        start, log = int(state["step"]), list(state.get("log", []))
        resumed_from = start
        reporter.note(f"resuming from step {start} of {cfg.steps} ({checkpoint})")
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher.to(device).eval().requires_grad_(False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counts_total: list[torch.Tensor] = []
    model.train()
    started = time.perf_counter()
    trained_tokens = 0
    live = {"text": ""}
    if log_file is not None and accelerator.is_main_process:
        _trim_log(log_file, start)

    def save(step: int) -> None:
        if checkpoint is None:
            return
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer,
                            {"step": step, "log": log, "options": resume_options or {}})
        accelerator.wait_for_everyone()

    step = start
    with _StopFlag() as stop, hidden_states_as_logits(accelerator.unwrap_model(model), teacher) as heads:
        for step in _track(reporter, range(start, cfg.steps), "Distilling", cfg.steps - start,
                           lambda: live["text"]):
            if _stop_everywhere(stop.requested, accelerator):
                save(step)
                raise TrainingInterrupted(
                    f"interrupted at step {step} of {cfg.steps}; resumable checkpoint saved in {checkpoint} "
                    "(rerun the same command with --resume)" if checkpoint else f"interrupted at step {step}")
            tick = time.perf_counter()
            factor = lr_factor(step, cfg.warmup, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            batch = chunks[plan.indices(step, accelerator.process_index)].to(device)
            with torch.no_grad(), autocast:
                teacher_out = teacher(input_ids=batch).logits  # final hidden states while `heads` is set
            with autocast:
                student_out = model(input_ids=batch).logits
                kl = (chunked_kl_to_teacher(student_out, teacher_out, *heads) if heads is not None
                      else kl_to_teacher(student_out, teacher_out))
            del teacher_out, student_out
            balance, counts = balance_loss(accelerator.unwrap_model(model))
            loss = kl + cfg.balance_coef * balance.to(kl.device)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            counts = [accelerator.reduce(c.to(device), "sum").cpu() for c in counts]
            counts_total = counts if not counts_total else [a + b for a, b in zip(counts_total, counts, strict=True)]
            kl_mean = accelerator.reduce(kl.detach(), "mean").item()
            bal_mean = accelerator.reduce(balance.detach().to(device), "mean").item()
            step_tokens = plan.global_batch * seq_len
            trained_tokens += step_tokens
            seconds = time.perf_counter() - tick
            entry = {"step": step + 1, "tokens": (step + 1) * step_tokens, "loss": round(kl_mean + cfg.balance_coef
                     * bal_mean, 6), "kl": round(kl_mean, 6), "balance": round(bal_mean, 6),
                     "lr": group_lr(optimizer), "tokens_per_s": round(step_tokens / max(seconds, 1e-9), 1)}
            log.append(entry)
            live["text"] = f"kl {kl_mean:.4f} | {entry['tokens']:,} tokens | {entry['tokens_per_s']:.0f} tok/s"
            if log_file is not None and accelerator.is_main_process:
                with open(log_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
            if on_step is not None:
                on_step(step + 1, entry)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save(step + 1)
    elapsed = time.perf_counter() - started
    loads = [(c / c.sum()).tolist() for c in counts_total]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = DistillResult(
        steps=cfg.steps, tokens=cfg.steps * plan.global_batch * seq_len,
        first_loss=log[0]["kl"] if log else None, final_loss=log[-1]["kl"] if log else None,
        losses=thin(log), expert_load=[[round(x, 4) for x in row] for row in loads],
        tokens_per_s=round(trained_tokens / max(elapsed, 1e-9), 1), seconds=round(elapsed, 2),
        resumed_from=resumed_from, peak_memory_bytes=peak)
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(model), result


def _stop_everywhere(requested: bool, accelerator) -> bool:
    """All processes must stop at the same step (saving waits for everyone), so agree on the flag."""
    if accelerator.num_processes == 1:
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def group_lr(optimizer) -> float:
    return float(f"{optimizer.param_groups[0]['lr']:.4g}")


def thin(log: list[dict[str, Any]], keep: int = 200) -> list[dict[str, Any]]:
    """At most `keep` evenly spaced entries (always the first and last) for moeify.json."""
    if len(log) <= keep:
        return list(log)
    stride = len(log) / (keep - 1)
    picked = [log[min(len(log) - 1, round(i * stride))] for i in range(keep - 1)] + [log[-1]]
    return picked


def _trim_log(path: Path, step: int) -> None:
    """Keep the loss log's entries up to `step` (a resumed run appends from there; a fresh one starts empty)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def _track(reporter: Reporter, items, description: str, total: int, postfix: Callable[[], str]):
    try:
        return reporter.track(items, description, total=total, postfix=postfix)
    except TypeError:  # a Reporter written before `postfix` existed
        return reporter.track(items, description, total=total)
