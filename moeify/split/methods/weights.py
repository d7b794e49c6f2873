"""`--method weights`: data-free split by balanced k-means on normalised neuron weight vectors.

Exact when every expert runs, and the reference for exactness tests; it knows nothing about which
neurons fire together, so quality at small top-k is poor (see docs/quality.md). Shared experts take
the neurons with the largest weight-norm product, a data-free stand-in for "fires for every token".
"""

from __future__ import annotations

import numpy as np
import torch

from moeify.split.methods.base import SplitMethod
from moeify.split.methods.cluster import balanced_kmeans, projection_matrix
from moeify.split.moe_layer import FFNWeights, MoELayer, split_by_groups


def neuron_features(ffn: FFNWeights, index: torch.Tensor, dims: int = 128, seed: int = 0) -> torch.Tensor:
    """Each neuron as its normalised gate row, up row and down column, concatenated and randomly projected.

    The projection is applied block by block, so the [n, 3*hidden] concatenation (700 MB for a
    Llama-3-8B layer) is never built. The result stays on the weights' device (the clustering runs there).
    """
    full = len(index) == ffn.size and bool((index == torch.arange(ffn.size, device=index.device)).all())
    parts = [ffn.gate, ffn.up, ffn.down.T] if full else [ffn.gate[index], ffn.up[index], ffn.down.T[index]]
    hidden = parts[0].shape[1]
    if 3 * hidden <= dims:
        return torch.cat([p / p.norm(dim=1, keepdim=True).clamp_min(1e-12) for p in parts], dim=1).float()
    proj = projection_matrix(3 * hidden, dims, seed, device=parts[0].device)
    out = torch.zeros(parts[0].shape[0], dims, device=parts[0].device)
    for i, p in enumerate(parts):  # (p / |p|) @ P == (p @ P) / |p|: no normalised copy of the weights
        out += (p @ proj[i * hidden:(i + 1) * hidden]) / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return out


def unit_router(centroids: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """Scale router rows so logits have about unit spread on RMS-normalised inputs (x = gamma * n, |n_i|~1)."""
    effective = centroids * (norm_weight.to(centroids.device, torch.float32)[None, :] if norm_weight is not None
                             else 1.0)
    return centroids / effective.norm(dim=1).max().clamp_min(1e-12)


class WeightsMethod(SplitMethod):
    name = "weights"

    def build(self, layer: int, ffn: FFNWeights) -> MoELayer:
        ctx = self.ctx
        m, experts = ctx.expert_size, ctx.experts
        importance = ffn.gate.norm(dim=1) * ffn.up.norm(dim=1) * ffn.down.norm(dim=0)
        n_shared = min(ctx.shared * m, ffn.size - experts)  # leave at least one neuron per routed expert
        order = torch.argsort(importance, descending=True)
        shared_idx, routed_idx = order[:n_shared], order[n_shared:]
        feats = neuron_features(ffn, routed_idx, seed=ctx.seed)
        labels = balanced_kmeans(feats, experts, capacity=m, seed=ctx.seed + layer)
        groups = [routed_idx[torch.from_numpy(np.flatnonzero(labels == e))] for e in range(experts)]
        zero = torch.zeros(ffn.gate.shape[1], device=ffn.gate.device)
        centroids = torch.stack([ffn.gate[g].mean(0) if len(g) else zero for g in groups])
        norm_name = ctx.family.ffn_norm_name(layer)
        gamma = ctx.reader.get(norm_name) if norm_name in ctx.reader else None
        return split_by_groups(ffn, shared_idx, groups, m, ctx.shared * m, unit_router(centroids, gamma))
