"""Checks on tensor values that every stage shares: a NaN or inf weight is an error naming the tensor."""

from __future__ import annotations

import torch

from moeify.errors import InputError


def require_finite(name: str, tensor: torch.Tensor, chunk: int = 1 << 20) -> None:
    """Raise InputError when `tensor` holds NaN or inf.

    The common case is one `aminmax` pass (NaN propagates into both results and an inf lands on one of
    them): a vectorised read of the tensor in its own dtype, 0.8 ms on an 8192x2048 bf16 matrix against
    55 ms for the float64 sum it replaced (which cost 1.8 s of a 2-layer 2048x8192 split); it allocates
    nothing of the tensor's size. float8, which has no aminmax kernel, is checked in float32 slices. Only a
    failing tensor is scanned in slices to say what it holds (a whole-tensor `isfinite` mask cost +140 MB
    peak RSS on SmolLM2's embedding).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if _all_finite(tensor, chunk):
        return
    flat = tensor.reshape(-1)
    nan = sum(int(torch.isnan(p.float()).sum()) for p in flat.split(chunk))
    inf = sum(int(torch.isinf(p.float()).sum()) for p in flat.split(chunk))
    what = "NaN" if nan else "inf"
    raise InputError(f"tensor {name!r} contains {what} values ({nan + inf} of {tensor.numel()})",
                     "the checkpoint is corrupt or diverged in training; fix or re-export it first")


def _all_finite(tensor: torch.Tensor, chunk: int) -> bool:
    if tensor.element_size() == 1:  # float8: no aminmax kernel
        return all(bool(torch.isfinite(p.float()).all()) for p in tensor.reshape(-1).split(chunk))
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
