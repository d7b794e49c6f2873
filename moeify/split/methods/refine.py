"""Layer-local refinement: a few hundred Adam steps on one split layer, to reproduce the dense output.

The closed-form steps (router by least squares, down projections by ridge) each fix one part of the
layer with the others held still, and none of them can move gate and up, which decide what the experts
compute. Refinement trains all of it at once (every expert's gate, up and down, the shared block and the
router) on the layer's cached calibration inputs, with the same target the ridge repair uses (the dense
model's output, or the compensated residual target). It is the blockwise reconstruction of SparseGPT and
OmniQuant applied to expert splitting: the objective is local, so memory stays at one layer and the cost
is a few dense-FFN forward/backward passes per step, with no pass through the whole model.

Routing is discrete. The forward uses the hard top-k choice with weight 1 per chosen expert (what the
written checkpoint computes), and the backward passes the gradient through a softmax of the router
logits (straight-through), so every expert's logit learns whether raising it would have lowered the
error at that token. Padding neurons stay zero.

The result is judged on held-out calibration sequences that refinement never trained on; when it does
not beat the closed-form layer there, the closed-form layer is kept, so refinement can only help. The
comparison is fair only if the closed-form layer did not see those sequences either: the activations
method fits its repair on the training sequences (`heldout_split`) whenever it refines.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moeify.split.methods.repair import neuron_blocks
from moeify.split.methods.router import unit_spread
from moeify.split.moe_layer import FFNWeights, MoELayer


@dataclass(frozen=True)
class RefineSettings:
    steps: int
    # Per step, relative to each tensor's own scale (Adam moves elements by ~lr x std). Held-out geomean of
    # SmolLM2's default split at 53248 calibration tokens: 1e-3 1.859x, 3e-3 1.836x, 1e-2 1.800x, 3e-2 1.839x
    # (seed 0); seed 1: 1e-3 1.842x, 1e-2 1.757x (docs/quality.md). With 4096 tokens 3e-3 overfitted.
    lr: float = 1e-2
    batch: int = 512  # tokens per step
    holdout: float = 0.125  # fraction of the calibration sequences kept out of training to judge the result
    train: tuple[str, ...] = ("gate", "up", "down")


def heldout_split(tokens: int, chunk_len: int, holdout: float) -> tuple[slice, slice]:
    """Train on the first sequences, hold out the last ones (whole sequences: no leakage inside a text)."""
    chunks = max(1, tokens // max(chunk_len, 1))
    held = max(1, math.ceil(chunks * holdout)) if chunks > 1 else 0
    if held == 0:  # a single sequence: hold out its last tokens instead
        cut = tokens - max(1, int(tokens * holdout))
    else:
        cut = (chunks - held) * chunk_len
    return slice(0, cut), slice(cut, tokens)


class _Trainable(torch.nn.Module):
    """The split layer as parameters: joined gate/up/down over all neurons (experts, then shared), router."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        joined, sizes = neuron_blocks(moe)
        self.experts = len(moe.experts)
        self.sizes = sizes
        self.gate = torch.nn.Parameter(joined.gate.float().clone())
        self.up = torch.nn.Parameter(joined.up.float().clone())
        self.down = torch.nn.Parameter(joined.down.float().clone())
        self.router = torch.nn.Parameter(moe.router.float().clone())
        live = (joined.gate.abs().sum(1) + joined.up.abs().sum(1) + joined.down.abs().sum(0)) > 0
        self.register_buffer("live", live.float())  # padding neurons are all-zero and stay so
        self.register_buffer("expert_of", torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)))

    def forward(self, x: torch.Tensor, top_k: int, straight_through: bool = True) -> torch.Tensor:
        acts = F.silu(x @ self.gate.T) * (x @ self.up.T) * self.live
        logits = x @ self.router.T
        hard = torch.zeros_like(logits).scatter_(1, torch.topk(logits, top_k, dim=-1).indices, 1.0)
        if straight_through:
            soft = torch.softmax(logits, dim=-1) * top_k
            weight = hard + soft - soft.detach()
        else:
            weight = hard
        if len(self.sizes) > self.experts:  # the shared block always runs, with weight 1
            weight = torch.cat([weight, torch.ones_like(weight[:, :1])], dim=1)
        return (acts * weight[:, self.expert_of]) @ self.down.T

    def to_moe(self, moe: MoELayer, x: torch.Tensor) -> MoELayer:
        gate, up, down = (t.detach() for t in (self.gate, self.up, self.down))
        live = self.live.bool()
        gate, up, down = gate * live[:, None], up * live[:, None], down * live[None, :]
        bounds = torch.tensor([0, *self.sizes]).cumsum(0).tolist()
        blocks = [FFNWeights(gate[a:b].contiguous(), up[a:b].contiguous(), down[:, a:b].contiguous())
                  for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        shared = blocks[self.experts] if len(blocks) > self.experts else None
        router = unit_spread(self.router.detach().float(), x)
        return MoELayer(blocks[:self.experts], router, shared, moe.dense, dict(moe.info))


def _fused_adam(device: torch.device) -> bool:
    """Whether this torch has the fused Adam kernel for `device`: 6.5 -> 3.5 ms a step on SmolLM2's layer
    (2 CPU cores); Adam was 19 of the refinement's 125 s in a profile of SmolLM2's default split. CUDA has
    it in every supported torch, the CPU from 2.4."""
    return device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= (2, 4))


def warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first tenth of the steps, then cosine decay to 0: Adam's first steps on a fresh
    layer have no second-moment estimate yet, and the last ones should not undo the fit with full-size moves."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))


def adam_steps(opt: torch.optim.Optimizer, steps: int, tokens: int, batch: int, seed: int,
               batch_loss: Callable[[torch.Tensor], torch.Tensor],
               after_step: Callable[[], None] | None = None) -> tuple[float | None, float | None]:
    """`steps` optimiser steps on random batches of token rows (with replacement, seeded), on the warm-up and
    cosine schedule; returns the first and last batch losses. `batch_loss` maps row indices to a scalar loss;
    bench/ variants share the loop with their own losses."""
    sched = warmup_cosine(opt, steps)
    g = torch.Generator().manual_seed(seed)
    device = opt.param_groups[0]["params"][0].device
    batch = min(batch, tokens)
    first = last = None
    for _ in range(steps):
        rows = torch.randint(0, tokens, (batch,), generator=g).to(device)
        loss = batch_loss(rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    return first, last


def _error(model: _Trainable, x: torch.Tensor, target: torch.Tensor, top_k: int, chunk: int = 4096) -> float:
    """Relative error of the hard-routed layer (what the checkpoint computes) on the given tokens."""
    num = den = 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            y = model(x[s:s + chunk], top_k, straight_through=False)
            t = target[s:s + chunk]
            num += float((y - t).pow(2).sum())
            den += float(t.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


def refine_layer(moe: MoELayer, x: torch.Tensor, target: torch.Tensor, top_k: int, settings: RefineSettings,
                 chunk_len: int, seed: int = 0) -> tuple[MoELayer, dict[str, Any]]:
    """Refined copy of `moe` (or `moe` itself when refinement does not help on held-out sequences).

    x: [tokens, hidden] the layer's calibration inputs in sequence order; target: what the layer must output.
    """
    train, held = heldout_split(x.shape[0], chunk_len, settings.holdout)
    x, target = x.float(), target.float()
    model = _Trainable(moe).to(x.device)  # the layer's inputs decide the device (split --device)
    before = _error(model, x[held], target[held], top_k)
    params = {n: p for n, p in model.named_parameters() if n in settings.train}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    scale = {name: float(p.detach().std().clamp_min(1e-8)) for name, p in params.items()}
    opt = torch.optim.Adam([{"params": [p], "lr": settings.lr * scale[n]} for n, p in params.items()],
                           betas=(0.9, 0.99), fused=_fused_adam(x.device))
    xt, tt = x[train], target[train]
    energy = tt.pow(2).sum(1).mean().clamp_min(1e-30)
    first, last = adam_steps(opt, settings.steps, xt.shape[0], settings.batch, seed,
                             lambda rows: (model(xt[rows], top_k) - tt[rows]).pow(2).sum(1).mean() / energy)
    after = _error(model, x[held], target[held], top_k)
    info = {"refine_steps": settings.steps, "error_heldout_before_refine": round(before, 5),
            "error_heldout_after_refine": round(after, 5), "refined": after < before,
            "refine_train_loss": [round(first or 0.0, 5), round(last or 0.0, 5)]}
    if after >= before:
        return moe, info
    return model.to_moe(moe, x), info
