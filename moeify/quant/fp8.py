"""FP8 (e4m3) weight quantization: one matrix in, FP8 values and float32 scales out.

Three ways to share a scale, all with `dequantized = fp8.float() * scale`:
- `block`: one scale per 128x128 tile (DeepSeek-V3; the scale is stored as `weight_scale_inv`),
- `channel`: one scale per output row (compressed-tensors FP8_DYNAMIC; stored as `weight_scale` [out, 1]),
- `tensor`: one scale for the whole matrix (compressed-tensors, stored as `weight_scale` [1]).

Scales are computed in float32 as amax/448, so the largest magnitude of each group lands exactly on
e4m3's largest finite value and nothing saturates. An all-zero group gets scale 1 (its values are 0
either way) instead of 0, which would make every reader divide by zero. A NaN or inf in a weight is an
error naming the tensor: it would otherwise become a NaN scale that silently poisons a whole block.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from moeify.io.checks import require_finite as check_finite

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
BLOCK = 128
SCHEMES = ("block", "channel", "tensor")
Scheme = Literal["block", "channel", "tensor"]


def scale_shape(scheme: Scheme, shape: tuple[int, int]) -> tuple[int, ...]:
    out_features, in_features = shape
    if scheme == "block":
        return (math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK))
    if scheme == "channel":
        return (out_features, 1)
    if scheme == "tensor":
        return (1,)
    raise ValueError(f"unknown scheme {scheme!r}")


def _amax_to_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize(weight: torch.Tensor, scheme: Scheme, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one [out, in] matrix; returns (fp8 values, float32 scales of `scale_shape(scheme, ...)`)."""
    w = checked_matrix(weight, name)
    scale, full = scales(w, scheme)
    return round_to_fp8(w, full), scale


def scales(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored scales, the scale of every element [out, in] or broadcastable to it) for a float32 matrix."""
    out_features, in_features = w.shape
    if scheme == "block":
        scale = _amax_to_scale(_block_amax(w))
        return scale.contiguous(), _expand_blocks(scale, out_features, in_features)
    if scheme == "channel":
        scale = _amax_to_scale(w.abs().amax(dim=1, keepdim=True))
    elif scheme == "tensor":
        scale = _amax_to_scale(w.abs().amax().reshape(1))
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return scale.contiguous(), scale


def round_to_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3 value of w / scale (saturating: a value past the largest finite one is clamped)."""
    return (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def checked_matrix(weight: torch.Tensor, name: str) -> torch.Tensor:
    """`weight` as float32, refused unless it is a finite 2-D matrix: every rounding path starts here."""
    if weight.ndim != 2:
        raise ValueError(f"{name}: expected a matrix, got shape {tuple(weight.shape)}")
    w = weight.to(torch.float32)
    check_finite(name, w)
    return w


def dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: Scheme, block: int = BLOCK) -> torch.Tensor:
    """float32 values from fp8 values and scales (the exact inverse readers apply)."""
    w = q.to(torch.float32)
    if scheme == "block":
        return w * _expand_blocks(scale.to(torch.float32), *w.shape, block=block)
    return w * scale.to(torch.float32)


def scheme_of_scale(q_shape: tuple[int, ...], scale_name: str, scale_shape_: tuple[int, ...]) -> Scheme:
    """Recognize the scheme of a stored (weight, scale) pair from names and shapes."""
    if scale_name.endswith("weight_scale_inv"):
        return "block"
    if tuple(scale_shape_) in ((1,), ()):
        return "tensor"
    if tuple(scale_shape_) == (q_shape[0], 1):
        return "channel"
    raise ValueError(f"{scale_name}: scale shape {list(scale_shape_)} fits no FP8 scheme for {list(q_shape)}")


def _block_amax(w: torch.Tensor) -> torch.Tensor:
    out_features, in_features = w.shape
    rows, cols = math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK)
    pad_r, pad_c = rows * BLOCK - out_features, cols * BLOCK - in_features
    a = w.abs()
    if pad_r or pad_c:  # zero padding never raises an amax
        a = torch.nn.functional.pad(a, (0, pad_c, 0, pad_r))
    return a.view(rows, BLOCK, cols, BLOCK).amax(dim=(1, 3))


def _expand_blocks(scale: torch.Tensor, out_features: int, in_features: int,
                   block: int = BLOCK) -> torch.Tensor:
    full = scale.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return full[:out_features, :in_features]
