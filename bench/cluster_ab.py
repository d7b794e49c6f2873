"""The torch balanced k-means against the scikit-learn one it replaced, on SmolLM2, in one process and tree.

    python bench/cluster_ab.py [--seeds 0 1] [--config 24x8x8] [--calibration-tokens N] [--refine-steps N]

For each seed it splits SmolLM2-135M with the default (activations, compensated) method twice, once with
each clustering, and prints the mean per-layer errors moeify.json records and the held-out perplexity
(`moeify eval`'s default text, --eval-chunks chunks). Several seeds show how much two clusterings of equal
quality differ anyway. Both implementations live in moeify/split/methods/cluster.py: scikit-learn's KMeans
with a sequential greedy capacity-constrained assignment (what the CPU runs) and the torch one (GPUs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moeify.split.methods import cluster  # noqa: E402


def _via(impl):
    """balanced_kmeans' signature over one of cluster.py's two implementations, whatever the device."""
    def run(features, k: int, capacity: int | None = None, iters: int = 8, seed: int = 0, device=None):
        x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).float()
        capacity = capacity or -(-x.shape[0] // k)
        if k == 1:
            return np.zeros(x.shape[0], dtype=np.int64)
        return impl(x.cpu().numpy(), k, capacity, iters, seed) if impl is cluster.cpu_balanced_kmeans \
            else impl(x, k, capacity, iters, seed)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--config", default="24x8x8", help="ROUTEDxTOPKxSHARED")
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--calibration-tokens", type=int, default=None, help="default: the split's (16384)")
    ap.add_argument("--refine-steps", type=int, default=None, help="default: the split's (150)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moeify-cluster-ab"))
    args = ap.parse_args()
    from bench._models import smollm2_folder
    from moeify.evaluate import EvalOptions, evaluate_model
    from moeify.split.convert import SplitOptions, split_model
    from moeify.split.methods import activations

    dense = smollm2_folder()
    experts, top_k, shared = (int(v) for v in args.config.split("x"))
    for seed in args.seeds:
        for name, impl in (("scikit-learn", cluster.cpu_balanced_kmeans), ("torch", cluster.torch_balanced_kmeans)):
            activations.balanced_kmeans = _via(impl)
            out = args.work / f"{name}-{seed}"
            start = time.perf_counter()
            cheap = {k: v for k, v in (("calibration_tokens", args.calibration_tokens),
                                       ("refine_steps", args.refine_steps)) if v is not None}
            r = split_model(dense, out, SplitOptions(experts=experts, top_k=top_k, shared=shared, seed=seed,
                                                     device="cpu", **cheap), overwrite=True)
            seconds = time.perf_counter() - start
            ppl = evaluate_model(out, EvalOptions(max_chunks=args.eval_chunks, device="cpu"))["perplexity"]
            info = r["method_info"]
            print(json.dumps({"clustering": name, "seed": seed, "split_s": round(seconds, 1),
                              "mean_error_after_repair": info.get("mean_error_after_repair"),
                              "mean_error_oracle": info.get("mean_error_oracle"), "perplexity": round(ppl, 3)}),
                  flush=True)


if __name__ == "__main__":
    main()
