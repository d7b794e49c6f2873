"""Time single stage-2 training steps on the real SmolLM2-135M split: stock vs masked experts forward.

    python bench/finetune_step.py 48x16x16 masked     # ROUTEDxTOPKxSHARED, then masked | stock
    python bench/finetune_step.py 8x2x0 stock --steps 5 --batch-size 4
    python bench/finetune_step.py 48x16x16 masked --device cuda --batch-size 16   # as `moeify finetune` on a GPU
    python bench/finetune_step.py 48x16x16 masked --gradient-checkpointing        # issue 17's memory goal
    python bench/finetune_step.py 48x16x16 masked --gradient-checkpointing --keep-allocator   # glibc as is
    python bench/finetune_step.py 48x16x16 masked --loss plain                    # the whole-logits loss, before
    python bench/finetune_step.py 48x16x16 masked --moe /tmp/split48              # a split made with `moeify split`

One step = the dense teacher's forward, the student's forward and backward (KL + balance term, as
`moeify finetune` computes them) and an AdamW step, on --batch-size x 512 tokens of Pride and Prejudice.
The split (default `activations`, calibrated on Pride and Prejudice) is cached in --workdir, shared with
bench/finetune_gpu.py. On CUDA the teacher is held in bf16 and both forwards run under bf16 autocast, as in
`moeify finetune`. The loss is `moeify finetune`'s: the vocabulary projection in chunks of the sequence
(`--loss chunked`, the default), or the whole batch's logits at once (`--loss plain`, what moeify did before
issue 17). Prints each step's phases and tokens/s, then the peak RSS (and peak GPU memory) of the whole
process (loading included); read the steps after the first two (allocator and thread-pool warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from pathlib import Path

import torch
from finetune_gpu import DATA, cached_split, smollm2_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="ROUTEDxTOPKxSHARED, e.g. 48x16x16")
    ap.add_argument("forward", choices=["masked", "stock"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moeify-finetune-bench"))
    ap.add_argument("--moe", type=Path, default=None, help="an existing split to train (default: made in --workdir)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--loss", default="chunked", choices=["chunked", "plain"])
    ap.add_argument("--keep-allocator", action="store_true",
                    help="with --gradient-checkpointing on CPU: leave glibc's dynamic mmap threshold as it is")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from moeify.data import load_tokenizer, tokenize_chunks
    from moeify.device import return_freed_blocks_promptly
    from moeify.finetune.distill import (
        DistillConfig,
        balance_loss,
        build_optimizer,
        chunked_kl_to_teacher,
        hidden_states_as_logits,
        kl_to_teacher,
    )
    from moeify.finetune.moe_model import load_student
    from moeify.finetune.run import load_teacher, pick_experts_forward, set_checkpointing, set_trainable
    from moeify.split.methods import DEFAULT_METHOD

    dense = smollm2_folder()
    moe = args.moe or cached_split(dense, args.workdir, args.config, DEFAULT_METHOD)
    chunks = tokenize_chunks(load_tokenizer(dense), (DATA / "pride_and_prejudice.txt").read_text(), 512,
                             max_chunks=args.batch_size)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    student = load_student(moe).to(device)
    set_trainable(student)
    used = pick_experts_forward(student, args.forward)
    if args.gradient_checkpointing:
        set_checkpointing(student, True)
        if not cuda and not args.keep_allocator:  # as `moeify finetune --gradient-checkpointing` on CPU
            return_freed_blocks_promptly()
    student.train()
    teacher = load_teacher(dense, args.device).to(device)
    optimizer = build_optimizer(student, DistillConfig(steps=args.steps))
    chunks = chunks.to(device)
    tokens = chunks.numel()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    label = f"{args.config} {used} loss={args.loss}{' checkpointing' if args.gradient_checkpointing else ''}"
    heads_context = hidden_states_as_logits(student, teacher) if args.loss == "chunked" else contextlib.nullcontext()
    with heads_context as heads:
        for step in range(args.steps):
            t0 = now()
            with torch.no_grad(), autocast:
                teacher_out = teacher(input_ids=chunks).logits
            t1 = now()
            with autocast:
                student_out = student(input_ids=chunks).logits
                kl = (chunked_kl_to_teacher(student_out, teacher_out, *heads) if heads is not None
                      else kl_to_teacher(student_out, teacher_out))
            t2 = now()
            loss = kl + 0.01 * balance_loss(student)[0].to(device)
            del teacher_out, student_out
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t3 = now()
            optimizer.step()
            t4 = now()
            print(f"{label} step {step + 1}: teacher {t1 - t0:.2f} s, student forward + loss {t2 - t1:.2f} s, "
                  f"backward {t3 - t2:.2f} s, optimizer {t4 - t3:.2f} s -> {tokens / (t4 - t0):.1f} tokens/s "
                  f"(loss {loss.item():.4f})", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
    print(f"{label}: peak RSS {peak:.2f} GiB{gpu}", flush=True)


if __name__ == "__main__":
    main()
