"""The torch balanced k-means against the scikit-learn one it replaced, on SmolLM2, in one process and tree.

    flock /tmp/moeify-heavy.lock python bench/cluster_ab.py [--seeds 0 1] [--config 24x8x8]

For each seed it splits SmolLM2-135M with the default (activations, compensated) method twice, once with
each clustering, and prints the mean per-layer errors moeify.json records and the held-out perplexity
(`moeify eval`'s default text, --eval-chunks chunks). Several seeds show how much two clusterings of equal
quality differ anyway. The reference below is the pre-torch implementation (scikit-learn's KMeans for the
centroids, then a sequential greedy capacity-constrained assignment over all sorted pairs), kept here only
to compare.
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


def reference_balanced_kmeans(features, k: int, capacity: int | None = None, iters: int = 8, seed: int = 0,
                              device=None) -> np.ndarray:
    from sklearn.cluster import KMeans

    x = (features.cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)).astype(np.float32)
    n = x.shape[0]
    capacity = capacity or -(-n // k)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    centroids = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=50).fit(x).cluster_centers_
    labels = None
    for _ in range(iters):
        d = (x * x).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
        order = np.argsort(d, axis=None, kind="stable")
        new = np.full(n, -1, dtype=np.int64)
        counts = np.zeros(k, dtype=np.int64)
        left = n
        for r, c in zip(*np.unravel_index(order, d.shape), strict=True):
            if new[r] < 0 and counts[c] < capacity:
                new[r], counts[c], left = c, counts[c] + 1, left - 1
                if left == 0:
                    break
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = x[labels == c]
            if len(members):
                centroids[c] = members.mean(axis=0)
    return labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--config", default="24x8x8", help="ROUTEDxTOPKxSHARED")
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moeify-cluster-ab"))
    args = ap.parse_args()
    from bench.split_bench import smollm2_folder
    from moeify.evaluate import EvalOptions, evaluate_model
    from moeify.split.convert import SplitOptions, split_model
    from moeify.split.methods import activations, cluster

    dense = smollm2_folder()
    experts, top_k, shared = (int(v) for v in args.config.split("x"))
    for seed in args.seeds:
        for name, impl in (("scikit-learn", reference_balanced_kmeans), ("torch", cluster.balanced_kmeans)):
            activations.balanced_kmeans = impl
            out = args.work / f"{name}-{seed}"
            start = time.perf_counter()
            r = split_model(dense, out, SplitOptions(experts=experts, top_k=top_k, shared=shared, seed=seed,
                                                     device="cpu"), overwrite=True)
            seconds = time.perf_counter() - start
            ppl = evaluate_model(out, EvalOptions(max_chunks=args.eval_chunks, device="cpu"))["perplexity"]
            info = r["method_info"]
            print(json.dumps({"clustering": name, "seed": seed, "split_s": round(seconds, 1),
                              "mean_error_after_repair": info.get("mean_error_after_repair"),
                              "mean_error_oracle": info.get("mean_error_oracle"), "perplexity": round(ppl, 3)}),
                  flush=True)


if __name__ == "__main__":
    main()
