"""`bench/heldout_variants.py gates=PARTS`: refinement also learns the routing weights a Qwen2-MoE checkpoint applies.

The shipped split writes near-uniform routing weights (router logits spread 1e-5, experts scaled by E) and a zero
shared-expert gate (sigmoid 0.5, shared down doubled), so every selected expert counts 1. Those weights are free
capacity at serving time (vLLM and transformers compute them anyway): E x softmax(tau x logits) per chosen expert
and 2 x sigmoid(g . x) on the shared block. PARTS (joined by +) says what refinement trains besides gate, up and
down: `tau` (the logit scale, >= 0, from 0), `router` (the router itself) and `sgate` (g, from 0). A winning
refinement's layer is written with them (router x tau, shared_expert_gate = g), its down projections refitted on
the gated activations. Measured 2026-12-07 (docs/quality.md): tau stays near 0 (0.006-0.03: the loss does not
want routing-probability weights), and `gates=sgate` costs 2.9% at 50% (1.571x against 1.527x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import moeify.split.convert as convert
import moeify.split.methods.activations as act
import moeify.split.methods.refine as R

PARTS = ("tau", "router", "sgate")
GATE_LR = 0.02  # tau's step (logits have unit spread) and the shared gate's, per unit of g . x


class GatedTrainable(R._Trainable):
    """The refined layer with Qwen2-MoE's routing weights in the forward pass (hard top-k kept)."""

    def __init__(self, moe):
        super().__init__(moe)
        self.tau = torch.nn.Parameter(torch.zeros(()))
        self.has_shared = len(self.sizes) > self.experts
        self.sgate = torch.nn.Parameter(torch.zeros(self.gate.shape[1]))

    def forward(self, x, top_k, straight_through=True):
        acts = F.silu(x @ self.gate.T) * (x @ self.up.T) * self.live
        logits = x @ self.router.T
        hard = torch.zeros_like(logits).scatter_(1, torch.topk(logits, top_k, dim=-1).indices, 1.0)
        weight = hard * (self.experts * torch.softmax(self.tau.clamp_min(0) * logits, dim=-1))
        if straight_through:
            soft = torch.softmax(logits, dim=-1) * top_k
            weight = weight + soft - soft.detach()
        if self.has_shared:
            weight = torch.cat([weight, 2 * torch.sigmoid(x @ self.sgate)[:, None]], dim=1)
        return (acts * weight[:, self.expert_of]) @ self.down.T

    def to_moe(self, moe, x):
        out = super().to_moe(moe, x)  # its router has unit logit spread on x: tau is rescaled to it
        spread = float(F.linear(x, self.router.detach().float()).std().clamp_min(1e-12))
        out.gating = {"tau": float(self.tau.detach().clamp_min(0)) * spread,
                      "sgate": self.sgate.detach().float().clone() if self.has_shared else None}
        return out


def gated_refine(parts: tuple[str, ...]):
    def refine_layer(moe, x, target, top_k, settings, chunk_len, seed=0):
        train, held = R.heldout_split(x.shape[0], chunk_len, settings.holdout)
        x, target = x.float(), target.float()
        model = GatedTrainable(moe).to(x.device)
        before = R._error(model, x[held], target[held], top_k)
        trained = ("gate", "up", "down", *parts)
        groups = []
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
            if name not in trained:
                continue
            if name in ("gate", "up", "down", "router"):
                lr = settings.lr * float(p.detach().std().clamp_min(1e-8))
            elif name == "tau":
                lr = GATE_LR
            else:  # Adam moves each of g's elements by ~lr: g . x by ~lr x mean|x| x sqrt(hidden)
                lr = GATE_LR / (float(x.abs().mean()) * math.sqrt(x.shape[1]))
            groups.append({"params": [p], "lr": lr})
        opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
        xt, tt = x[train], target[train]
        energy = tt.pow(2).sum(1).mean().clamp_min(1e-30)

        def clamp_tau():  # a negative scale would flip which experts the engine's top-k picks
            with torch.no_grad():
                model.tau.clamp_(min=0)

        R.adam_steps(opt, settings.steps, xt.shape[0], settings.batch, seed,
                     lambda rows: (model(xt[rows], top_k) - tt[rows]).pow(2).sum(1).mean() / energy, clamp_tau)
        after = R._error(model, x[held], target[held], top_k)
        info = {"refine_steps": settings.steps, "error_heldout_before_refine": round(before, 5),
                "error_heldout_after_refine": round(after, 5), "refined": after < before,
                "gate_tau": round(float(model.tau.detach()), 4),
                "gate_sgate_norm": round(float(model.sgate.detach().norm()), 4)}
        return (moe, info) if after >= before else (model.to_moe(moe, x), info)

    return refine_layer


def _gated_feats(moe, x, feats):
    """The joined activations times each neuron's routing weight (1 where the layer carries no gating)."""
    gating = getattr(moe, "gating", None)
    if gating is None:
        return feats
    weight = len(moe.experts) * torch.softmax(gating["tau"] * (x.float() @ moe.router.float().T), dim=-1)
    sizes = [b.size for b in moe.experts]
    if moe.shared is not None:
        weight = torch.cat([weight, 2 * torch.sigmoid(x.float() @ gating["sgate"])[:, None]], dim=1)
        sizes.append(moe.shared.size)
    index = torch.repeat_interleave(torch.arange(len(sizes), device=x.device), torch.tensor(sizes, device=x.device))
    return feats * weight[:, index].to(feats.dtype)


def patch_gates(spec: str) -> None:
    parts = tuple(p for p in spec.split("+") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"gates=: unknown part(s) {sorted(unknown)}; choose from {'+'.join(PARTS)}")
    refit, output, write = act.refit_down, act.moe_output, convert._write_moe_layer

    def feats_of(moe, x, feats):
        if feats is None:
            feats = act.ffn_activations(act.neuron_blocks(moe)[0], x)
        return _gated_feats(moe, x, feats)

    def gated_refit(moe, x, target, choices, ridge=1e-2, chunk=4096, feats=None):
        gating = getattr(moe, "gating", None)
        if gating is None:
            return refit(moe, x, target, choices, ridge, chunk, feats=feats)
        out = refit(moe, x, target, choices, ridge, chunk, feats=feats_of(moe, x, feats))
        out.gating = gating
        return out

    def gated_output(moe, x, choices, feats=None):
        if getattr(moe, "gating", None) is None:
            return output(moe, x, choices, feats=feats)
        return output(moe, x, choices, feats=feats_of(moe, x, feats))

    def gated_write(w, target, tplan, layer, moe, dtype, router_logit_std):
        gating = getattr(moe, "gating", None)
        if gating is None:
            return write(w, target, tplan, layer, moe, dtype, router_logit_std)
        gate_name = target.shared_gate_name(layer)

        class SharedGate:  # the writer plans a zero shared gate: this one goes in its place
            def write(self, name, tensor):
                if name == gate_name and gating["sgate"] is not None:
                    tensor = gating["sgate"][None, :].float().contiguous()
                w.write(name, tensor)

        write(SharedGate(), target, tplan, layer, moe, dtype, max(gating["tau"], router_logit_std))

    act.refine_layer, act.refit_down, act.moe_output = gated_refine(parts), gated_refit, gated_output
    convert._write_moe_layer = gated_write
