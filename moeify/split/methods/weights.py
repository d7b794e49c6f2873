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
    """Each neuron as its normalised gate row, up row and down column, concatenated and randomly projected."""
    return neuron_stats(ffn, index, dims, seed)[0]


def neuron_stats(ffn: FFNWeights, index: torch.Tensor, dims: int = 128, seed: int = 0
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The neurons' features (see `neuron_features`) and the float32 norms of their gate row, up row and down
    column, from one float32 pass over each block (the importance needs the norms the features divide by).

    The projection is applied block by block, so the [n, 3*hidden] concatenation (700 MB for a
    Llama-3-8B layer) is never built. The weights may be in their stored dtype (bf16): each block's rows
    are gathered in that dtype (exact) and only that block is widened to float32, so the features are
    bit for bit those of a float32 layer while at most one float32 block exists at a time. The result
    stays on the weights' device (the clustering runs there). With every neuron in stored order (`index`
    is arange, as the weights method asks) nothing is gathered; pass down as a transposed view of a
    [n, hidden] tensor and down.T needs no copy either.
    """
    full = len(index) == ffn.size and bool((index == torch.arange(ffn.size, device=index.device)).all())
    blocks = (ffn.gate, ffn.up, ffn.down.T)
    hidden = ffn.gate.shape[1]
    rows = len(index)
    if 3 * hidden <= dims:
        parts = [_rows_f32(b, index, full) for b in blocks]
        norms = [p.norm(dim=1) for p in parts]
        return torch.cat([p / n[:, None].clamp_min(1e-12) for p, n in zip(parts, norms, strict=True)], dim=1), norms
    proj = projection_matrix(3 * hidden, dims, seed, device=ffn.gate.device)
    out = torch.zeros(rows, dims, device=ffn.gate.device)
    norms = []
    for i, b in enumerate(blocks):  # (p / |p|) @ P == (p @ P) / |p|: no normalised copy of the weights
        p = _rows_f32(b, index, full)
        norms.append(p.norm(dim=1))
        out += (p @ proj[i * hidden:(i + 1) * hidden]) / norms[-1][:, None].clamp_min(1e-12)
        del p
    return out, norms


def _rows_f32(block: torch.Tensor, index: torch.Tensor, full: bool) -> torch.Tensor:
    """`block[index]` in float32, gathered before widening (a gather is exact in any dtype, and half the bytes).

    down.T is a transposed view: gathering its rows reads one strided column per neuron (3x slower on a
    CPU than a transpose copy followed by a row gather, which yields the same contiguous rows).
    """
    block = block.contiguous()  # down.T: one transpose copy, so rows (and their norms) are contiguous
    return (block if full else block.index_select(0, index)).float()


def unit_router(centroids: torch.Tensor, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """Scale router rows so logits have about unit spread on RMS-normalised inputs (x = gamma * n, |n_i|~1)."""
    effective = centroids * (norm_weight.to(centroids.device, torch.float32)[None, :] if norm_weight is not None
                             else 1.0)
    return centroids / effective.norm(dim=1).max().clamp_min(1e-12)


class WeightsMethod(SplitMethod):
    """Works on the weights as stored: convert.py hands them over in the checkpoint's dtype (`stored_dtype`).

    Everything that is computed (importance, features, centroids) is computed in float32 from exact
    copies, so the grouping is what a float32 layer gives; the experts are gathered rows and columns,
    which are exact in bf16 too, so no float32 copy of the layer and no conversion back are needed.
    """

    name = "weights"
    stored_dtype = True  # SplitMethod.stored_dtype: convert.py loads the FFN without widening it

    def build(self, layer: int, ffn: FFNWeights) -> MoELayer:
        ctx = self.ctx
        m, experts = ctx.expert_size, ctx.experts
        # Features and norms of every neuron in stored order, from one float32 pass over each block; down_proj
        # is passed as a transposed view of one transpose copy, so its columns are contiguous rows there
        # (no strided column reads or reductions). The routed rows are then taken from the small
        # [n, 128] features: the same rows as gathering the weights first, without gathering the layer.
        by_rows = FFNWeights(ffn.gate, ffn.up, ffn.down.T.contiguous().T)
        all_feats, (gate_norm, up_norm, down_norm) = neuron_stats(
            by_rows, torch.arange(ffn.size, device=ffn.gate.device), seed=ctx.seed)
        del by_rows
        importance = gate_norm * up_norm * down_norm
        n_shared = min(ctx.shared * m, ffn.size - experts)  # leave at least one neuron per routed expert
        order = torch.argsort(importance, descending=True)
        shared_idx, routed_idx = order[:n_shared], order[n_shared:]
        feats = all_feats[routed_idx]
        labels = balanced_kmeans(feats, experts, capacity=m, seed=ctx.seed + layer)
        # Each expert's neurons in stored order: the order inside an expert does not change what it computes,
        # and ascending indices make the down_proj column gather read memory in order (2.5x faster on a CPU
        # at Llama-3-8B width; docs/benchmarks.md).
        groups = [routed_idx[torch.from_numpy(np.flatnonzero(labels == e))].sort().values for e in range(experts)]
        shared_idx = shared_idx.sort().values
        zero = torch.zeros(ffn.gate.shape[1], device=ffn.gate.device)
        centroids = torch.stack([ffn.gate[g].mean(0, dtype=torch.float32) if len(g) else zero for g in groups])
        norm_name = ctx.family.ffn_norm_name(layer)
        gamma = ctx.reader.get(norm_name) if norm_name in ctx.reader else None
        return split_by_groups(ffn, shared_idx, groups, m, ctx.shared * m, unit_router(centroids, gamma))
