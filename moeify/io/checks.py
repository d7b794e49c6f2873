"""Checks on tensor values that every stage shares: a NaN or inf weight is an error naming the tensor."""

from __future__ import annotations

import torch

from moeify.errors import InputError


def require_finite(name: str, tensor: torch.Tensor, chunk: int = 1 << 20) -> None:
    """Raise InputError when `tensor` holds NaN or inf.

    The common case costs one float64 sum (NaN and inf propagate; finite 8/16/32-bit values cannot
    overflow it) and allocates nothing of the tensor's size; only a failing tensor is scanned in slices
    to say what it holds (a whole-tensor `isfinite` mask cost +140 MB peak RSS on SmolLM2's embedding).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if torch.isfinite(tensor.sum(dtype=torch.float64)):
        return
    flat = tensor.reshape(-1)
    nan = sum(int(torch.isnan(p.float()).sum()) for p in flat.split(chunk))
    inf = sum(int(torch.isinf(p.float()).sum()) for p in flat.split(chunk))
    what = "NaN" if nan else "inf"
    raise InputError(f"tensor {name!r} contains {what} values ({nan + inf} of {tensor.numel()})",
                     "the checkpoint is corrupt or diverged in training; fix or re-export it first")
