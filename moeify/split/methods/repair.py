"""Closed-form, layer-wise repair of a split FFN: refit the down projections to reproduce the dense output.

Given the router's choices on calibration tokens, the split layer's output is linear in the experts'
down projections: y(t) = sum over active neurons j of a_j(t) * d_j. So the down projections of all
experts and the shared block that best reproduce the dense output Y are one ridge regression
(neurons x neurons normal equations), regularised towards the original weights so that neurons the
calibration rarely activates keep what they had. No backpropagation, seconds per layer.
"""

from __future__ import annotations

import torch

from moeify.split.calibrate import ffn_activations
from moeify.split.moe_layer import FFNWeights, MoELayer


def neuron_blocks(moe: MoELayer) -> tuple[FFNWeights, list[int]]:
    """All neurons of the layer as one block (experts in order, then shared) and each expert's size."""
    blocks = list(moe.experts) + ([moe.shared] if moe.shared is not None else [])
    joined = FFNWeights(torch.cat([b.gate for b in blocks]), torch.cat([b.up for b in blocks]),
                        torch.cat([b.down for b in blocks], dim=1))
    return joined, [b.size for b in blocks]


def active_mask(choices: torch.Tensor, sizes: list[int], experts: int) -> torch.Tensor:
    """[tokens, neurons] 1 where the neuron's expert runs at the token (shared neurons always)."""
    onehot = torch.zeros(choices.shape[0], len(sizes), dtype=torch.float32)
    onehot.scatter_(1, choices, 1.0)
    if len(sizes) > experts:
        onehot[:, experts:] = 1.0
    return torch.repeat_interleave(onehot, torch.tensor(sizes), dim=1)


def moe_output(moe: MoELayer, x: torch.Tensor, choices: torch.Tensor, feats: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The layer's sum-semantics output for given routing choices ([tokens, top_k]).

    `feats` may pass the joined activations (see `joined_activations`) when they are already known.
    """
    joined, sizes = neuron_blocks(moe)
    feats = ffn_activations(joined, x) if feats is None else feats
    return (feats * active_mask(choices, sizes, len(moe.experts))) @ joined.down.T


def joined_activations(acts: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """The split layer's neuron activations gathered from the dense ones (layout: dense index or -1 for padding).

    Splitting only regroups neurons, so this is exact and saves recomputing gate and up projections.
    """
    return acts[:, layout.clamp_min(0)] * (layout >= 0).to(acts.dtype)


def refit_down(moe: MoELayer, x: torch.Tensor, target: torch.Tensor, choices: torch.Tensor,
               ridge: float = 1e-2, chunk: int = 4096, feats: torch.Tensor | None = None) -> MoELayer:
    """A copy of `moe` whose down projections minimise |output - target|^2 + ridge-pull to the old ones."""
    joined, sizes = neuron_blocks(moe)
    n = joined.size
    gram = torch.zeros(n, n, dtype=torch.float64)
    rhs = torch.zeros(n, target.shape[1], dtype=torch.float64)
    for s in range(0, x.shape[0], chunk):
        f = ffn_activations(joined, x[s:s + chunk]) if feats is None else feats[s:s + chunk]
        f = f * active_mask(choices[s:s + chunk], sizes, len(moe.experts))
        gram += (f.T @ f).double()  # float32 products, float64 sums: 2x faster, same solution
        rhs += (f.T @ target[s:s + chunk]).double()
    old = joined.down.T.double()
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    new = torch.linalg.solve(gram + lam * torch.eye(n, dtype=gram.dtype), rhs + lam * old).T.float()
    parts = torch.split(new, sizes, dim=1)
    experts = [FFNWeights(e.gate, e.up, d.contiguous()) for e, d in zip(moe.experts, parts, strict=False)]
    shared = moe.shared
    if shared is not None:
        shared = FFNWeights(shared.gate, shared.up, parts[-1].contiguous())
    return MoELayer(experts, moe.router, shared, moe.dense, dict(moe.info))


def relative_error(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output - target).norm() / target.norm().clamp_min(1e-12))
