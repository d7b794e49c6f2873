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


def _blocks(moe: MoELayer) -> list[FFNWeights]:
    """The layer's experts in order, then the shared block: the neuron order of every joined view."""
    return list(moe.experts) + ([moe.shared] if moe.shared is not None else [])


def neuron_blocks(moe: MoELayer) -> tuple[FFNWeights, list[int]]:
    """All neurons of the layer as one block (experts in order, then shared) and each expert's size."""
    blocks = _blocks(moe)
    joined = FFNWeights(torch.cat([b.gate for b in blocks]), torch.cat([b.up for b in blocks]),
                        torch.cat([b.down for b in blocks], dim=1))
    return joined, [b.size for b in blocks]


def active_mask(choices: torch.Tensor, sizes: list[int], experts: int) -> torch.Tensor:
    """[tokens, neurons] 1 where the neuron's expert runs at the token (shared neurons always)."""
    onehot = torch.zeros(choices.shape[0], len(sizes), dtype=torch.float32, device=choices.device)
    onehot.scatter_(1, choices, 1.0)
    if len(sizes) > experts:
        onehot[:, experts:] = 1.0
    return torch.repeat_interleave(onehot, torch.tensor(sizes, device=choices.device), dim=1)


def tokens_choosing(choices: torch.Tensor, expert: int) -> torch.Tensor:
    """Indices of the tokens whose routing `choices` ([tokens, top_k]) include `expert`."""
    return (choices == expert).any(dim=1).nonzero().squeeze(1)


def moe_output(moe: MoELayer, x: torch.Tensor, choices: torch.Tensor, feats: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The layer's sum-semantics output for given routing choices ([tokens, top_k]).

    `feats` may pass the joined activations (see `joined_activations`) when they are already known.
    Each routed expert's down projection runs on the tokens that chose it only: a product over every
    token with the others masked to zero spent (experts - top_k) / experts of its work on zeros (75% at 8
    top-2), and joining the down projections first copied the layer on every call.
    """
    blocks = _blocks(moe)
    if feats is None:
        joined, _ = neuron_blocks(moe)
        feats = ffn_activations(joined, x)
    experts = len(moe.experts)
    out = torch.zeros(feats.shape[0], blocks[0].down.shape[0], dtype=feats.dtype, device=feats.device)
    lo = 0
    for b, block in enumerate(blocks):
        hi = lo + block.size
        down = block.down.to(feats.dtype)
        if b < experts:
            rows = tokens_choosing(choices, b)
            if rows.numel():
                out.index_add_(0, rows, feats[rows, lo:hi] @ down.T)
        else:
            out += feats[:, lo:hi] @ down.T
        lo = hi
    return out


def joined_activations(acts: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """The split layer's neuron activations gathered from the dense ones (layout: dense index or -1 for padding).

    Splitting only regroups neurons, so this is exact and saves recomputing gate and up projections.
    """
    layout = layout.to(acts.device)
    return acts[:, layout.clamp_min(0)] * (layout >= 0).to(acts.dtype)


def refit_down(moe: MoELayer, x: torch.Tensor, target: torch.Tensor, choices: torch.Tensor,
               ridge: float = 1e-2, chunk: int = 4096, feats: torch.Tensor | None = None) -> MoELayer:
    """A copy of `moe` whose down projections minimise |output - target|^2 + ridge-pull to the old ones.

    The normal equations are exact on every device: float32 products summed in float64, a float64 solve
    (autocast is switched off here; only the activations may come in as bf16 from a GPU).
    """
    blocks = _blocks(moe)
    sizes = [b.size for b in blocks]
    n, tokens, width = sum(sizes), x.shape[0], target.shape[1]
    experts = len(moe.experts)
    active = (choices.shape[1] * sizes[0] + (sizes[-1] if len(sizes) > experts else 0)) / n
    neuron_cost = active * n * n * tokens + n * tokens * width + n**3 / 3  # n x n normal equations
    token_cost = tokens * tokens * n + 2 * n * tokens * width + tokens**3 / 3  # tokens x tokens (Woodbury)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if token_cost < neuron_cost:  # each block's own down projection in, each block's new one out
            joined = neuron_blocks(moe)[0] if feats is None else None  # gate and up give the activations
            parts = _token_space_downs([b.down for b in blocks], sizes, experts, x, target, choices, ridge, chunk,
                                       feats, joined)
        else:
            if feats is None:
                joined, _ = neuron_blocks(moe)
            else:  # only the down projections are read: joining gate and up too would copy the layer twice
                empty = torch.empty(n, 0, device=x.device)
                joined = FFNWeights(empty, empty, torch.cat([b.down for b in blocks], dim=1))
            new = _refit_in_neuron_space(joined, sizes, experts, x, target, choices, ridge, chunk, feats)
            parts = [p.contiguous() for p in torch.split(new, sizes, dim=1)]
        del joined
    experts = [FFNWeights(e.gate, e.up, d) for e, d in zip(moe.experts, parts, strict=False)]
    shared = moe.shared
    if shared is not None:
        shared = FFNWeights(shared.gate, shared.up, parts[-1])
    return MoELayer(experts, moe.router, shared, moe.dense, dict(moe.info))


def _refit_in_neuron_space(joined: FFNWeights, sizes: list[int], experts: int, x: torch.Tensor, target: torch.Tensor,
                           choices: torch.Tensor, ridge: float, chunk: int, feats: torch.Tensor | None) -> torch.Tensor:
    """New down projections [hidden, n] from the n x n normal equations (when tokens outnumber neurons)."""
    n, device = joined.size, x.device
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    rhs = torch.zeros(n, target.shape[1], dtype=torch.float64, device=device)
    for s in range(0, x.shape[0], chunk):
        f = ffn_activations(joined, x[s:s + chunk]) if feats is None else feats[s:s + chunk]
        picked = choices[s:s + chunk]
        f = f.float() * active_mask(picked, sizes, experts)
        t = target[s:s + chunk].float()
        # Block row b of the normal equations only sums tokens where block b runs (elsewhere its
        # masked activations are exact zeros): the same sums at (top_k + shared) / experts of the cost.
        # Only the upper triangle is formed (columns from the block's own onwards; the solve reads no
        # other): fewer products and smaller row copies (SmolLM2's default layout, 48 x top-16 + 16 shared
        # on 46000 synthetic tokens: 1.47 -> 1.13 s a call).
        for b, (lo, hi) in enumerate(zip(offsets, offsets[1:], strict=False)):
            if b < experts:
                rows = tokens_choosing(picked, b)
                if rows.numel() == 0:
                    continue
                fb, tb = f[:, lo:].index_select(0, rows), t.index_select(0, rows)
            else:
                fb, tb = f[:, lo:], t
            block = fb[:, :hi - lo]
            gram[lo:hi, lo:] += (block.T @ fb).double()  # float32 products, float64 sums: same solution
            rhs[lo:hi] += (block.T @ tb).double()
    old = joined.down.T.double()
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(lam)  # in place: a second n x n float64 matrix is 1.6 GB at Llama-3-8B width
    new = _spd_solve(gram, rhs + lam * old, upper=True).T.float()
    del gram
    return new


def _token_space_downs(downs: list[torch.Tensor], sizes: list[int], experts: int, x: torch.Tensor,
                       target: torch.Tensor, choices: torch.Tensor, ridge: float, chunk: int,
                       feats: torch.Tensor | None, joined: FFNWeights | None = None) -> list[torch.Tensor]:
    """The same ridge solution through the tokens x tokens system (when neurons outnumber tokens).

    With A the masked activations [tokens, n], D0 the old down projections and Y the target,
    (A^T A + lam I)^-1 (A^T Y + lam D0) = D0 + A^T (A A^T + lam I)^-1 (Y - A D0)  (push-through identity),
    so a Llama-3-8B layer calibrated on 4096 tokens solves 4096 x 4096 instead of 14336 x 14336: a
    fraction of the work and of the memory. lam is the same (ridge x the mean of diag(A^T A)).

    Every product runs block by block on the tokens where the block is active: a routed expert's columns
    of A are zero elsewhere, so A A^T gains only on its tokens' rows and columns, and A D0 and A^T W only
    on its rows. At top-2 of 8 that is 1/16 of the kernel's work and 1/4 of the others'.

    Each block's new down projection comes out as its own contiguous [hidden, size] matrix, so the layer's
    down projections are never joined, copied and split again (three passes over them: 1.51 -> 1.34 s a
    layer in bench/split_bench.py, 8 layers of 2048x8192, 512 tokens). `joined` gives the activations
    when `feats` is None.
    """
    n, tokens, device = sum(sizes), x.shape[0], x.device
    if feats is None:
        feats = torch.cat([ffn_activations(joined, x[s:s + chunk]) for s in range(0, tokens, chunk)])
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    blocks = []  # (the tokens where the block runs or None for all, its activations there, its old down)
    for b, (lo, hi) in enumerate(zip(offsets, offsets[1:], strict=False)):
        rows = tokens_choosing(choices, b) if b < experts else None
        block = feats[:, lo:hi] if rows is None else feats[:, lo:hi].index_select(0, rows)
        blocks.append((rows, block.float(), downs[b].float()))
    lam = ridge * (sum(f.pow(2).sum(dtype=torch.float64) for _, f, _ in blocks) / n).clamp_min(1e-12)
    kernel = torch.zeros(tokens, tokens, dtype=torch.float64, device=device)
    residual = target.double()
    for rows, f, old in blocks:  # float32 products, float64 sums
        if rows is None:
            kernel += (f @ f.T).double()
            residual -= (f @ old.T).double()
        elif rows.numel():
            kernel.index_put_((rows[:, None], rows[None, :]), (f @ f.T).double(), accumulate=True)
            residual.index_add_(0, rows, (f @ old.T).double(), alpha=-1)
    kernel.diagonal().add_(lam)
    weights = _spd_solve(kernel, residual).float()  # [tokens, hidden]
    del kernel, residual
    new = []
    for rows, f, old in blocks:  # one float32 product per block; old + delta rounds once
        if rows is None:
            new.append(old + weights.T @ f)
        elif rows.numel():
            new.append(old + weights.index_select(0, rows).T @ f)
        else:
            new.append(old.clone())  # chosen nowhere: nothing to fit, and no tensor shared with the input
    return new


def _spd_solve(a: torch.Tensor, b: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """Solve a x = b for a symmetric positive definite a (ridge-regularised normal equations).

    Cholesky does half the work of the LU factorisation `torch.linalg.solve` does: 1 TFLOP instead of
    2 at Llama-3-8B width. Only the lower triangle is read, or with `upper` only the upper one, so that
    caller may leave the lower unfilled. LU, the fallback for a numerically indefinite matrix, reads all
    of `a`: with `upper` it first gets the upper triangle mirrored into the lower, in place.
    """
    factor, info = torch.linalg.cholesky_ex(a, upper=upper)
    if int(info) == 0:
        return torch.cholesky_solve(b, factor, upper=upper)
    del factor
    if upper:  # one n x n temporary, not two
        a.triu_()
        a += a.triu(1).T
    return torch.linalg.solve(a, b)


def relative_error(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output - target).norm() / target.norm().clamp_min(1e-12))
