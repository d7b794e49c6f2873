"""The shared NaN/inf check: every dtype a checkpoint can hold, every position (vector body and tail)."""

from __future__ import annotations

import math

import pytest
import torch

from moeify.errors import InputError
from moeify.io.checks import require_finite

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("position", [0, 17, 4095, 4096 * 3 - 1])
def test_a_single_non_finite_value_is_found_and_named(dtype, bad, position):
    if dtype == torch.float8_e4m3fn and math.isinf(bad):
        pytest.skip("e4m3fn has no inf: torch saturates it to 448 on assignment")
    t = torch.randn(3, 4096).to(dtype)
    t.view(-1)[position] = bad
    with pytest.raises(InputError, match=r"tensor 'w' contains (NaN|inf) values \(1 of 12288\)"):
        require_finite("w", t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_tensors_pass_including_extremes_and_views(dtype):
    t = torch.randn(64, 48).to(dtype)
    big = torch.finfo(dtype).max
    t[0, 0], t[1, 1] = big, -big  # the largest finite values must not read as overflow
    require_finite("w", t)
    require_finite("w", t.t())  # a non-contiguous view
    require_finite("w", torch.empty(0, dtype=dtype))


def test_a_non_finite_value_in_a_transposed_view_is_found():
    t = torch.randn(64, 48).t()
    t[5, 7] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        require_finite("w", t)
