"""The faster `--method weights` must give the very split the slower one gave.

Two changes are checked for equality, not closeness: the vectorised greedy assignment against the
Python loop it replaced, and the split of a bf16 checkpoint done in bf16 (the FFN as stored, experts
gathered without a float32 round trip) against the same split done on a float32 copy of each layer.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from moeify.io.reader import CheckpointReader
from moeify.io.writer import ShardedWriter, TensorSpec
from moeify.split.convert import SplitOptions, split_model
from moeify.split.methods.cluster import greedy_assign, projection_matrix
from moeify.split.methods.weights import WeightsMethod, neuron_features, neuron_stats
from moeify.split.moe_layer import FFNWeights


def loop_assign(d: np.ndarray, capacity: int) -> np.ndarray:
    """The sequential greedy the vectorised rounds replaced, verbatim: every pair in stable distance order."""
    n, k = d.shape
    order = np.argsort(d, axis=None, kind="stable")
    new = np.full(n, -1, dtype=np.int64)
    counts = np.zeros(k, dtype=np.int64)
    left = n
    for r, c in zip(*np.unravel_index(order, d.shape), strict=True):
        if new[r] < 0 and counts[c] < capacity:
            new[r], counts[c], left = c, counts[c] + 1, left - 1
            if left == 0:
                break
    return new


@pytest.mark.parametrize("n,k,capacity", [(64, 8, 8), (100, 7, 15), (50, 4, 30), (33, 5, 6), (40, 6, 5),
                                          (1, 1, 1), (200, 16, 13)])
@pytest.mark.parametrize("ties", [False, True])
def test_greedy_assign_matches_the_loop(n, k, capacity, ties):
    rng = np.random.default_rng(n * 31 + k)
    for _ in range(5):
        d = rng.normal(size=(n, k)).astype(np.float32)
        if ties:  # few distinct values: ties inside rows, across rows and across clusters everywhere
            d = np.round(d * 2).astype(np.float32)
        assert np.array_equal(greedy_assign(d, capacity), loop_assign(d, capacity))


def test_greedy_assign_on_kmeans_shaped_distances():
    """Distances as cpu_balanced_kmeans builds them (clustered points, skewed cluster sizes)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16)).astype(np.float32)
    x = (centres[rng.integers(0, 3, size=512)] + 0.3 * rng.normal(size=(512, 16))).astype(np.float32)
    d = (x * x).sum(1, keepdims=True) - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]
    assert np.array_equal(greedy_assign(d, 64), loop_assign(d, 64))


def _ffn(dtype: torch.dtype, hidden: int = 48, n: int = 40) -> FFNWeights:
    g = torch.Generator().manual_seed(5)
    return FFNWeights(*(torch.randn(s, generator=g).to(dtype) for s in ((n, hidden), (n, hidden), (hidden, n))))


@pytest.mark.parametrize("hidden", [48, 32])  # 3 * 48 > 128: projected; 3 * 32 <= 128: concatenated
@pytest.mark.parametrize("permuted", [False, True])
def test_features_of_bf16_weights_are_those_of_their_float32_copy(hidden, permuted):
    bf16 = _ffn(torch.bfloat16, hidden)
    index = torch.randperm(bf16.size, generator=torch.Generator().manual_seed(1))[:30] if permuted \
        else torch.arange(bf16.size)
    got = neuron_features(bf16, index)
    want = neuron_features(bf16.to(torch.float32), index)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("chunk", [7, 40, 512])  # several blocks with a ragged last one, one block, larger
@pytest.mark.parametrize("permuted", [False, True])
def test_chunked_projection_matches_float64(chunk, permuted):
    """Features projected a few rows at a time are the float64 projection of the normalised weights."""
    ffn = _ffn(torch.bfloat16)
    index = torch.randperm(ffn.size, generator=torch.Generator().manual_seed(2))[:33] if permuted \
        else torch.arange(ffn.size)
    feats, norms = neuron_stats(ffn, index, chunk=chunk)
    parts = [b.double()[index] for b in (ffn.gate, ffn.up, ffn.down.T)]
    want_norms = [p.norm(dim=1) for p in parts]
    joined = torch.cat([p / n[:, None] for p, n in zip(parts, want_norms, strict=True)], dim=1)
    want = joined @ projection_matrix(joined.shape[1], 128).double()
    torch.testing.assert_close(feats.double(), want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(norms, want_norms, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=0)


def _bf16_copy(src, dst):
    """The same checkpoint with every tensor stored as bf16 (what most Hub checkpoints are)."""
    reader = CheckpointReader(src)
    specs = [TensorSpec(n, torch.bfloat16, tuple(reader.info(n).shape)) for n in reader.names()]
    dst.mkdir()
    with ShardedWriter(dst, specs) as w:
        for s in specs:
            w.write(s.name, reader.get(s.name).to(torch.bfloat16))
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _tensors(folder):
    reader = CheckpointReader(folder)
    return {n: reader.get(n) for n in reader.names()}


@pytest.mark.parametrize("source,dtype,shared", [("bf16", "auto", 0), ("bf16", "auto", 1),
                                                 ("bf16", "float32", 1), ("float32", "bfloat16", 1),
                                                 ("float32", "auto", 0)])
def test_split_in_stored_dtype_equals_the_float32_split(tiny_models, tmp_path, monkeypatch, source, dtype, shared):
    folder = tiny_models["llama"]
    if source == "bf16":
        folder = _bf16_copy(folder, tmp_path / "bf16")
    options = SplitOptions(experts=3, top_k=2, shared=shared, method="weights", dtype=dtype)
    seen, build = [], WeightsMethod.build
    monkeypatch.setattr(WeightsMethod, "build", lambda self, i, ffn: seen.append(ffn.gate.dtype) or build(self, i, ffn))
    split_model(folder, tmp_path / "stored", options)
    assert seen == [torch.bfloat16 if source == "bf16" else torch.float32] * 2  # the FFN as stored, both layers
    monkeypatch.setattr(WeightsMethod, "build", build)
    monkeypatch.setattr(WeightsMethod, "stored_dtype", False)  # the former path: each layer widened to float32
    split_model(folder, tmp_path / "float32", options)
    got, want = _tensors(tmp_path / "stored"), _tensors(tmp_path / "float32")
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    shutil.rmtree(tmp_path / "float32")
