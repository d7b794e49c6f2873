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


def neuron_stats(ffn: FFNWeights, index: torch.Tensor, dims: int = 128, seed: int = 0, chunk: int = 512
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The neurons' features (see `neuron_features`) and the float32 norms of their gate row, up row and down
    column, from one float32 pass over each block (the importance needs the norms the features divide by).

    The projection is applied block by block and `chunk` rows at a time: one reused float32 buffer of
    [chunk, hidden] (8 MiB at Llama-3-8B width) holds the widened rows while the product reads them, so
    they are still in cache, where widening a whole [14336, 4096] block first wrote and re-read 235 MB
    (0.58 -> 0.34 s a layer at 8B shapes on a 2-core CPU, docs/benchmarks.md). The weights may be in their
    stored dtype (bf16): rows are gathered in that dtype (exact) and widened into the buffer, so the
    features are those of a float32 layer. The result stays on the weights' device (the clustering runs
    there). With every neuron in stored order (`index` is arange, as the weights method asks) nothing is
    gathered; pass down as a transposed view of a [n, hidden] tensor and down.T needs no copy either.
    """
    full = len(index) == ffn.size and bool((index == torch.arange(ffn.size, device=index.device)).all())
    blocks = (ffn.gate, ffn.up, ffn.down.T)
    hidden = ffn.gate.shape[1]
    rows = len(index)
    if 3 * hidden <= dims:
        parts = [_rows(b, index, full).float() for b in blocks]
        norms = [p.norm(dim=1) for p in parts]
        return torch.cat([p / n[:, None].clamp_min(1e-12) for p, n in zip(parts, norms, strict=True)], dim=1), norms
    device = ffn.gate.device
    proj = projection_matrix(3 * hidden, dims, seed, device=device)
    out = torch.zeros(rows, dims, device=device)
    buffer = torch.empty(min(chunk, rows), hidden, device=device)
    norms = []
    for i, b in enumerate(blocks):  # (p / |p|) @ P == (p @ P) / |p|: no normalised copy of the weights
        b = _rows(b, index, full)
        block_proj = proj[i * hidden:(i + 1) * hidden]
        norm = torch.empty(rows, device=device)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            p = buffer[:stop - start]
            p.copy_(b[start:stop])
            torch.linalg.vector_norm(p, dim=1, out=norm[start:stop])
            out[start:stop] += (p @ block_proj) / norm[start:stop, None].clamp_min(1e-12)
        norms.append(norm)
        del b
    return out, norms


def _rows(block: torch.Tensor, index: torch.Tensor, full: bool) -> torch.Tensor:
    """`block[index]` as contiguous rows in the stored dtype (a gather is exact in any dtype, and half the bytes).

    down.T is a transposed view: gathering its rows reads one strided column per neuron (3x slower on a
    CPU than a transpose copy followed by a row gather, which yields the same contiguous rows); widening
    strided columns chunk by chunk was slower still (0.28 s against 0.17 s a block at 8B shapes).
    """
    block = block.contiguous()  # down.T: one transpose copy, so rows (and their norms) are contiguous
    return block if full else block.index_select(0, index)


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
