"""Time single stage-2 training steps on the real SmolLM2-135M split: stock vs masked experts forward.

    python bench/finetune_step.py 48x16x16 masked     # ROUTEDxTOPKxSHARED, then masked | stock
    python bench/finetune_step.py 8x2x0 stock --steps 5 --batch-size 4

One step = the dense teacher's forward, the student's forward and backward (KL + balance term, as
`moeify finetune` computes them) and an AdamW step, on --batch-size x 512 tokens of Pride and Prejudice.
The split (default `activations`, calibrated on Pride and Prejudice) is cached in --workdir, shared with
bench/finetune_gpu.py. Prints each step's phases and tokens/s, then the process's peak RSS; read the
steps after the first two (allocator and thread-pool warm-up).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from finetune_gpu import DATA, smollm2_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="ROUTEDxTOPKxSHARED, e.g. 48x16x16")
    ap.add_argument("forward", choices=["masked", "stock"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moeify-finetune-bench"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from moeify.data import load_tokenizer, tokenize_chunks
    from moeify.finetune.distill import DistillConfig, balance_loss, build_optimizer, kl_to_teacher
    from moeify.finetune.moe_model import load_student
    from moeify.finetune.run import pick_experts_forward, set_trainable
    from moeify.methods import DEFAULT_METHOD
    from moeify.split import SplitOptions, split_model

    dense = smollm2_folder()
    experts, top_k, shared = (int(v) for v in args.config.split("x"))
    moe = args.workdir / f"smollm2-{DEFAULT_METHOD}-{args.config}"
    if not (moe / "config.json").is_file():
        split_model(dense, moe, SplitOptions(experts=experts, top_k=top_k, shared=shared,
                                             calibration=str(DATA / "pride_and_prejudice.txt")), overwrite=True)
    chunks = tokenize_chunks(load_tokenizer(dense), (DATA / "pride_and_prejudice.txt").read_text(), 512,
                             max_chunks=args.batch_size)
    student = load_student(moe)
    set_trainable(student)
    used = pick_experts_forward(student, args.forward)
    teacher = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval().requires_grad_(False)
    optimizer = build_optimizer(student, DistillConfig(steps=args.steps))
    tokens = chunks.numel()
    for step in range(args.steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher_logits = teacher(input_ids=chunks).logits
        t1 = time.perf_counter()
        student_logits = student(input_ids=chunks).logits
        t2 = time.perf_counter()
        loss = kl_to_teacher(student_logits, teacher_logits) + 0.01 * balance_loss(student)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        print(f"{args.config} {used} step {step + 1}: teacher {t1 - t0:.2f} s, student forward {t2 - t1:.2f} s, "
              f"backward {t3 - t2:.2f} s, optimizer {t4 - t3:.2f} s -> {tokens / (t4 - t0):.1f} tokens/s "
              f"(loss {loss.item():.4f})", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.config} {used}: peak RSS {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
