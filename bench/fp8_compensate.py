"""Error-compensated FP8 rounding (GPTQ's column-by-column update on the e4m3 grid).

Rounding each weight to its nearest e4m3 value leaves a ~2.6% relative error per matrix that no choice
of scale removes: e4m3 has 3 mantissa bits, and the error is relative to each value. What a layer's
output feels is not that error but `(W - Q) X` over the inputs X it really sees. Given the inputs'
second moments H = X^T X, GPTQ (Frantar et al., 2022) rounds one input column at a time and moves the
rounding error of that column onto the columns not rounded yet, along H's inverse, so that later
roundings cancel it. The output keeps the exact format of plain rounding: the same scales (computed
from the original weights, as round-to-nearest does), values on the same grid; only which neighbour
each value rounds to changes. Readers cannot tell the difference, and nothing else in the checkpoint
changes.

Everything is float64 here: H can be ill-conditioned (padding neurons are all zero, some inputs are
nearly collinear), and the damping below keeps its Cholesky factor defined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeify.quant.fp8 import FP8_DTYPE, Scheme, checked_matrix, round_to_fp8, scales
from moeify.quant.plan import classify

DEFAULT_DAMP = 0.01  # relative to H's mean diagonal; GPTQ's default
COLUMN_BLOCK = 128  # columns updated together (lazy batch updates: same result, fewer passes over W)


def compensated_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, name: str = "weight",
                         damp: float = DEFAULT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 values and scales of `weight` [out, in] that minimise the output error on inputs with second
    moments `hessian` [in, in] (X^T X summed over tokens); same return format as `fp8.quantize`.

    Columns are taken in decreasing order of H's diagonal (GPTQ's act-order): the inputs with the most
    energy are rounded first, while there are the most columns left to absorb their error.
    """
    w = checked_matrix(weight, name)
    stored, full = scales(w, scheme)
    out_features, in_features = w.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"{name}: hessian {tuple(hessian.shape)} does not fit a {[out_features, in_features]} weight")
    full = full.expand(out_features, in_features)
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0  # inputs that are always zero: their columns cannot move the output
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    h = h[order][:, order]
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    u = _inverse_cholesky_upper(h, name)

    work = w.to(torch.float64)[:, order].clone()
    step = full.to(torch.float64)[:, order]
    work[:, dead[order]] = 0.0  # any value there is free; zero rounds exactly
    q = torch.empty(out_features, in_features, dtype=FP8_DTYPE)
    for start in range(0, in_features, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, in_features)
        block = work[:, start:end].clone()
        errors = torch.empty_like(block)
        ub = u[start:end, start:end]
        for i in range(end - start):
            column = block[:, i]
            s = step[:, start + i]
            rounded = round_to_fp8(column.float(), s.float())
            q[:, start + i] = rounded
            err = (column - rounded.to(torch.float64) * s) / ub[i, i]
            block[:, i:] -= err.unsqueeze(1) * ub[i, i:].unsqueeze(0)
            errors[:, i] = err
        work[:, end:] -= errors @ u[start:end, end:]
    inverse = torch.argsort(order)
    return q[:, inverse].contiguous(), stored


def _inverse_cholesky_upper(h: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, the only form of the inverse the column updates use."""
    for extra in (0.0, 0.1, 1.0):  # more damping if rounding made the damped H not quite positive definite
        m = h if not extra else h + extra * float(torch.diagonal(h).mean()) * torch.eye(len(h), dtype=h.dtype)
        lower, info = torch.linalg.cholesky_ex(m)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError(f"{name}: the calibration inputs' second moments are not positive definite even damped")


def add_second_moments(acc: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """acc + X^T X in float64 for inputs x [..., in]; `weight` [tokens] scales each token's row (routing
    weights: an expert's output error reaches the layer output multiplied by them)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    if weight is not None:
        x = x * weight.reshape(-1, 1).to(torch.float64)
    h = x.T @ x
    return h if acc is None else acc.add_(h)


@torch.no_grad()
def input_second_moments(model, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X of the inputs of every projection the default plan quantizes, over the calibration chunks.

    Keys: the parameter name for 2-D weights; `{fused name}.{expert}` for the fused expert tensors, where
    each expert's rows are only the tokens routed to it, weighted by their routing weights (an expert's
    error reaches the layer output scaled by them). gate and up share one input, so one matrix each.
    """
    moments: dict[str, torch.Tensor] = {}
    hooks = []

    def linear_hook(name: str):
        def hook(module, args):
            moments[name] = add_second_moments(moments.get(name), args[0])
        return hook

    def experts_hook(name: str):
        def hook(module, args):
            x, index, weights = args[:3]
            for e in range(module.num_experts):
                slot, token = torch.where((index == e).T)
                if not len(token):
                    continue
                xe, we = x[token], weights[token, slot]
                key = f"{name}.gate_up_proj.{e}"
                moments[key] = add_second_moments(moments.get(key), xe, we)
                gate, up = F.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
                key = f"{name}.down_proj.{e}"
                moments[key] = add_second_moments(moments.get(key), module.act_fn(gate) * up, we)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and classify(f"{name}.weight") in ("attention", "shared_expert", "mlp"):
            hooks.append(module.register_forward_pre_hook(linear_hook(f"{name}.weight")))
        elif hasattr(module, "gate_up_proj") and hasattr(module, "num_experts"):
            hooks.append(module.register_forward_pre_hook(experts_hook(name)))
    try:
        for row in calib:
            model(row[None])
    finally:
        for h in hooks:
            h.remove()
    return moments
