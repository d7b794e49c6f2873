"""`bench/heldout_variants.py tokw=MODE`: weight the tokens of every least-squares fit of the split.

SmolLM2 writes a massive activation at the first token of every sequence (`python bench/massive_tokens.py`):
that token holds 99.9% of layer 11's FFN output energy, and the residual stream at that token is 180x the median
token's after layer 11 and still 33x after layer 27; layer 28 takes it out again. The split's fits (reassignment,
router, ridge repair, refinement and its keep-if-better error) sum squared errors over tokens, so at layers 11
and 28 they are mostly fits of the sequences' first tokens. MODE:
  resid  weight token t by 1 / |h_t|^2, h the dense residual stream after the layer: the next layer reads
         RMSNorm(h), so an output error matters relative to |h_t|;
  cap    tokens whose target energy exceeds 100x the layer's median are outliers; where they hold more than
         half of the target's energy, their weights are scaled so they hold exactly half.
Weights have mean 1; the shared block, the grouping and the next layer's input are unchanged. Measured
2026-12-07 (docs/quality.md): resid 2.346x at 50% (the first token's output is given up, and the model needs
it), cap 1.546x against 1.527x.
"""

from __future__ import annotations

import math
import sys

import torch

import moeify.split.methods.activations as act
import moeify.split.methods.refine as R
from moeify.split.methods.router import unit_spread

OUTLIER = 100.0  # x the median token's target energy


def token_weights(mode: str, target: torch.Tensor, residual_after: torch.Tensor) -> torch.Tensor:
    if mode == "resid":
        w = 1.0 / residual_after.float().pow(2).sum(1).clamp_min(1e-12)
    else:
        energy = target.float().pow(2).sum(1)
        out = energy > OUTLIER * energy.median()
        big, small = float(energy[out].sum()), float(energy[~out].sum())
        w = torch.ones_like(energy)
        if big > small:
            w[out] = small / big
        print(f"tokw cap: {int(out.sum())} outliers, share {big / max(big + small, 1e-30):.3f}", file=sys.stderr,
              flush=True)
    return w / w.mean()


def _weighted_error(model, x, target, top_k, w, chunk=4096):
    num = den = 0.0
    with torch.no_grad():
        for a in range(0, x.shape[0], chunk):
            y = model(x[a:a + chunk], top_k, straight_through=False)
            t, ww = target[a:a + chunk], w[a:a + chunk]
            num += float(((y - t).pow(2).sum(1) * ww).sum())
            den += float((t.pow(2).sum(1) * ww).sum())
    return math.sqrt(num / max(den, 1e-30))


def patch_token_weights(mode: str) -> None:
    if mode not in ("resid", "cap"):
        raise SystemExit(f"tokw=: unknown mode {mode!r}; choose resid or cap")
    state: dict[str, torch.Tensor | None] = {"root": None}  # the roots of the current layer's weights, [tokens, 1]
    refit, reassign = act.refit_down, act.reassign
    target_of, fit_router = act.ActivationsMethod.compensated_target, act.ActivationsMethod.fit_router

    def root(rows: int) -> torch.Tensor:  # the fit rows are a prefix of the calibration tokens
        return state["root"][:rows]

    def weighted_target(self, dense_y):
        target = target_of(self, dense_y)
        state["root"] = token_weights(mode, target, self.teacher.residual() + dense_y).sqrt()[:, None]
        return target

    def weighted_refit(moe, x, target, choices, ridge=1e-2, chunk=4096, feats=None):
        s = root(target.shape[0])
        if feats is None:
            feats = act.ffn_activations(act.neuron_blocks(moe)[0], x)
        return refit(moe, x, target * s.to(target.dtype), choices, ridge, chunk, feats=feats * s.to(feats.dtype))

    def weighted_reassign(groups, routed, acts, down, x, *args, **kwargs):
        s = root(x.shape[0])  # linear in acts and x: scaling rows weights every sum it forms
        return reassign(groups, routed, acts * s.to(acts.dtype), down, x * s.to(x.dtype), *args, **kwargs)

    def weighted_router(self, x, norms):
        s = root(x.shape[0])
        return unit_spread(fit_router(self, x * s.to(x.dtype), norms * s.to(norms.dtype)), x.float())

    def weighted_refine(moe, x, target, top_k, settings, chunk_len, seed=0):
        w = state["root"].to(x.device).pow(2)[:, 0]  # squared back from the roots, as in the runs measured
        train, held = R.heldout_split(x.shape[0], chunk_len, settings.holdout)
        x, target = x.float(), target.float()
        model = R._Trainable(moe).to(x.device)
        before = _weighted_error(model, x[held], target[held], top_k, w[held])
        params = {n: p for n, p in model.named_parameters() if n in settings.train}
        for n, p in model.named_parameters():
            p.requires_grad_(n in params)
        opt = torch.optim.Adam([{"params": [p], "lr": settings.lr * float(p.detach().std().clamp_min(1e-8))}
                                for p in params.values()], betas=(0.9, 0.99), fused=R._fused_adam(x.device))
        xt, tt, wt = x[train], target[train], w[train]
        energy = (tt.pow(2).sum(1) * wt).mean().clamp_min(1e-30)
        R.adam_steps(opt, settings.steps, xt.shape[0], settings.batch, seed,
                     lambda rows: ((model(xt[rows], top_k) - tt[rows]).pow(2).sum(1) * wt[rows]).mean() / energy)
        after = _weighted_error(model, x[held], target[held], top_k, w[held])
        info = {"refine_steps": settings.steps, "error_heldout_before_refine": round(before, 5),
                "error_heldout_after_refine": round(after, 5), "refined": after < before}
        return (moe, info) if after >= before else (model.to_moe(moe, x), info)

    act.ActivationsMethod.compensated_target = weighted_target
    act.ActivationsMethod.fit_router = weighted_router
    act.refit_down, act.reassign, act.refine_layer = weighted_refit, weighted_reassign, weighted_refine
