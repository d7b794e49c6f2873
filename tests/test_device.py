"""--device for split and eval, the two-stream runner, torch clustering, and per-layer release of tensors.

All of it runs on the CPU: an absent GPU must be a clean usage error, `--device cpu` must equal the
default there, and the GPU's precision policy (bf16 products under autocast) is exercised through CPU
autocast so that dtype mismatches show up here rather than on the first GPU.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from moeify.cli import app
from moeify.device import Compute, check_device_name, resolve_device
from moeify.errors import UsageError
from moeify.io.reader import CheckpointReader, load_json
from moeify.split.calibrate import LayerRunner
from moeify.split.convert import SplitOptions, split_model
from moeify.split.methods.cluster import balanced_assign, balanced_kmeans
from moeify.split.moe_layer import FFNWeights
from tests.char_tokenizer import add_char_tokenizer
from tests.tiny_models import COMMON, _randomize

NO_GPU = not torch.cuda.is_available()


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_device_names_resolve(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:", "cuda:x", "gpu"):
        with pytest.raises(UsageError, match="--device"):
            check_device_name(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError) as e:
        resolve_device("cuda:0")
    assert e.value.exit_code == 2 and "no CUDA GPU" in e.value.message and "--device cpu" in e.value.hint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda", 0) and resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(UsageError, match="only 1 CUDA GPU visible"):
        resolve_device("cuda:1")
    assert Compute.for_device(torch.device("cuda", 0)).matmul_dtype == torch.bfloat16
    assert Compute.for_device("cpu").matmul_dtype is None


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["split", "eval"])
def test_unavailable_device_is_one_line_exit_2_and_no_output(tiny_models, tmp_path, command):
    out = tmp_path / "moe"
    args = ([command, str(tiny_models["llama"]), "-e", "2", "-k", "1", "-o", str(out)] if command == "split"
            else [command, str(tiny_models["llama"])])
    result = CliRunner().invoke(app, [*args, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cuda" in lines[0] and "--device cpu" in lines[0]
    assert not out.exists() and not any(tmp_path.iterdir())


@pytest.mark.skipif(not NO_GPU, reason="auto picks the GPU where one is visible")
@pytest.mark.parametrize("method", ["weights", "activations"])
def test_device_cpu_equals_default(tiny_models, tmp_path, method):
    dense = add_char_tokenizer(tiny_models["llama"], copy_to=tmp_path / "dense")
    opts = dict(experts=4, top_k=2, shared=1, method=method, calibration_tokens=256)
    a = split_model(dense, tmp_path / "auto", SplitOptions(**opts))
    b = split_model(dense, tmp_path / "cpu", SplitOptions(**opts, device="cpu"))
    assert a["options"]["device"] == "auto" and b["options"]["device"] == "cpu"
    ta, tb = _tensors(tmp_path / "auto"), _tensors(tmp_path / "cpu")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_two_streams_in_one_runner_equal_two_runners(tiny_models):
    """One runner stepping two streams through each loaded layer is bit-identical to two runners."""
    folder = tiny_models["qwen3"]
    reader = CheckpointReader(folder)
    config = load_json(folder / "config.json", "config")
    tokens = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(2))
    one = LayerRunner(folder, reader, config, tokens, batch=2, streams=2)
    first, second = (LayerRunner(folder, reader, config, tokens, batch=2) for _ in range(2))
    loads = []
    real_load = one._load_layer
    one._load_layer = lambda i: loads.append(i) or real_load(i)
    dense_view = one.stream(1)
    for i in range(one.layers):
        p = f"model.layers.{i}.mlp."
        ffn = FFNWeights(*(reader.get(p + k + "_proj.weight", torch.float32) for k in ("gate", "up", "down")))
        x0, x1 = one.ffn_input(i), dense_view.ffn_input(i)
        r0, r1 = first.ffn_input(i), second.ffn_input(i)
        assert torch.equal(x0, r0) and torch.equal(x1, r1)
        assert torch.equal(one.residual(0), first.residual()) and torch.equal(dense_view.residual(), second.residual())
        y_split, y_dense = 0.5 * ffn.forward(x0), ffn.forward(x1)  # the streams diverge from layer 1 on
        one.advance(y_split, 0)
        dense_view.advance(y_dense)
        first.advance(y_split)
        second.advance(y_dense)
    assert loads == list(range(one.layers))  # each layer materialised once for both streams
    assert torch.equal(one.hidden[0], first.hidden[0]) and torch.equal(one.hidden[1], second.hidden[0])
    assert not torch.equal(one.hidden[0], one.hidden[1])


def test_runner_refuses_to_skip_an_unadvanced_stream(tiny_models):
    folder = tiny_models["llama"]
    runner = LayerRunner(folder, CheckpointReader(folder), load_json(folder / "config.json", "config"),
                         torch.zeros(1, 8, dtype=torch.long), streams=2)
    x = runner.ffn_input(0)
    runner.advance(torch.zeros_like(x), 0)
    with pytest.raises(RuntimeError, match="advance"):
        runner.ffn_input(1)


def test_balanced_assignment_respects_capacity_and_is_near_greedy():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(500, 7, generator=g)
    labels = balanced_assign(d.numpy(), capacity=72)
    assert isinstance(labels, np.ndarray) and (labels >= 0).all() and np.bincount(labels).max() <= 72
    # The sequential greedy (all pairs in order of distance) as the reference: same total cost within 2%.
    order = np.argsort(d.numpy(), axis=None, kind="stable")
    ref = np.full(500, -1)
    counts = np.zeros(7, dtype=int)
    for r, c in zip(*np.unravel_index(order, d.shape), strict=True):
        if ref[r] < 0 and counts[c] < 72:
            ref[r], counts[c] = c, counts[c] + 1
    cost = float(d[torch.arange(500), torch.from_numpy(labels)].sum())
    ref_cost = float(d[torch.arange(500), torch.from_numpy(ref)].sum())
    assert cost <= 1.02 * ref_cost
    with pytest.raises(ValueError, match="cannot hold"):
        balanced_assign(d, capacity=71)


def test_balanced_kmeans_recovers_planted_groups():
    g = torch.Generator().manual_seed(3)
    centers = 10 * torch.randn(8, 16, generator=g)
    truth = torch.arange(8).repeat_interleave(40)
    x = centers[truth] + torch.randn(320, 16, generator=g)
    labels = balanced_kmeans(x, 8, capacity=40, seed=1)
    assert np.bincount(labels).tolist() == [40] * 8
    for k in range(8):  # every planted group is one cluster
        assert len(set(labels[truth.numpy() == k].tolist())) == 1
    assert np.array_equal(labels, balanced_kmeans(x.numpy(), 8, capacity=40, seed=1))  # numpy in, same answer


def _deep_llama(folder, layers: int = 6):
    config = LlamaConfig(**{**COMMON, "num_hidden_layers": layers}, tie_word_embeddings=False)
    torch.manual_seed(0)
    _randomize(LlamaForCausalLM(config), 0).save_pretrained(folder, safe_serialization=True)
    return add_char_tokenizer(folder)


def _live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # noqa: BLE001 - half-built or exotic objects
            continue
    return total


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_split_releases_tensors_layer_by_layer(tmp_path, monkeypatch, method):
    """Live tensor bytes at the start of every layer stay flat: nothing of a finished layer is kept."""
    from moeify.io import writer
    from moeify.split.methods import METHODS

    # Tensors queued for the writer thread are alive until written, however a layer is released; the queue
    # has its own bound (tests/test_writer.py), so this count is taken with writes in place.
    monkeypatch.setattr(writer, "DEFAULT_WRITE_BEHIND_BYTES", 0)
    dense = _deep_llama(tmp_path / "dense")
    cls = METHODS[method]
    real_build = cls.build
    live: list[int] = []

    def build(self, layer, ffn):
        live.append(_live_tensor_bytes())
        return real_build(self, layer, ffn)  # (keeping each result in a list here makes the test fail)

    monkeypatch.setattr(cls, "build", build)
    split_model(dense, tmp_path / "moe", SplitOptions(experts=4, top_k=2, shared=1, method=method,
                                                      calibration_tokens=256))
    assert len(live) == 6
    # Layer 0 may still be setting up (lazy caches); from layer 1 on the count must not climb.
    assert max(live[2:]) <= live[1] + 4096, live


def test_gpu_precision_policy_runs_on_cpu_autocast(tiny_models, tmp_path, monkeypatch):
    """The GPU's bf16-autocast policy, emulated on the CPU: every dtype meets, and the errors stay close."""
    dense = add_char_tokenizer(tiny_models["llama"], copy_to=tmp_path / "dense")
    opts = SplitOptions(experts=4, top_k=2, shared=1, calibration_tokens=256, device="cpu")
    exact = split_model(dense, tmp_path / "fp32", opts)
    monkeypatch.setattr(Compute, "for_device", classmethod(lambda cls, d, m="auto": cls(torch.device("cpu"),
                                                                                         torch.bfloat16)))
    mixed = split_model(dense, tmp_path / "bf16", opts)
    e32, e16 = (r["method_info"]["mean_error_after_repair"] for r in (exact, mixed))
    assert np.isfinite(e16) and abs(e16 - e32) < 0.05 * max(e32, 1e-3) + 0.01


@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU (bench/gpu_check.sh runs this on a lent one)")
@pytest.mark.parametrize("method", ["weights", "activations"])
def test_cuda_split_is_close_to_cpu(tiny_models, tmp_path, method):
    dense = add_char_tokenizer(tiny_models["llama"], copy_to=tmp_path / "dense")
    opts = dict(experts=4, top_k=2, shared=1, method=method, calibration_tokens=256)
    cpu = split_model(dense, tmp_path / "cpu", SplitOptions(**opts, device="cpu"))
    torch.cuda.reset_peak_memory_stats()
    gpu = split_model(dense, tmp_path / "cuda", SplitOptions(**opts, device="cuda"))
    assert torch.cuda.memory_allocated() < 1 << 20  # nothing of the model stays on the device
    if method == "activations":
        e_cpu, e_gpu = (r["method_info"]["mean_error_after_repair"] for r in (cpu, gpu))
        assert abs(e_gpu - e_cpu) < 0.05 * e_cpu + 0.01
    assert _tensors(tmp_path / "cpu").keys() == _tensors(tmp_path / "cuda").keys()


def _random_moe(g: torch.Generator, hidden: int, m: int, experts: int):
    """A random split layer: `experts` routed experts and a shared block, all of m neurons."""
    from moeify.split.moe_layer import MoELayer

    blocks = [FFNWeights(*(torch.randn(s, generator=g) for s in ((m, hidden), (m, hidden), (hidden, m))))
              for _ in range(experts + 1)]
    return MoELayer(blocks[:experts], torch.randn(experts, hidden, generator=g), blocks[experts])


def test_repair_token_space_equals_neuron_space():
    """The Woodbury (tokens x tokens) route gives the ridge solution of the n x n normal equations."""
    from moeify.split.methods import repair

    g = torch.Generator().manual_seed(5)
    hidden, m, experts, tokens = 16, 8, 4, 60
    moe = _random_moe(g, hidden, m, experts)
    x = torch.randn(tokens, hidden, generator=g)
    target = torch.randn(tokens, hidden, generator=g)
    choices = torch.topk(torch.randn(tokens, experts, generator=g), 2, dim=-1).indices
    joined, sizes = repair.neuron_blocks(moe)
    args = (joined, sizes, experts, x, target, choices, 0.5, 7, None)
    by_neurons = repair._refit_in_neuron_space(*args)
    by_tokens = torch.cat(repair._token_space_downs(list(torch.split(joined.down, sizes, dim=1)), *args[1:], joined),
                          dim=1)
    torch.testing.assert_close(by_tokens, by_neurons, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(by_neurons, joined.down, atol=1e-3)  # the refit moved the weights


def test_neuron_space_repair_matches_float64_reference():
    """The upper-triangle block rows give the ridge solution of the whole masked normal equations."""
    from moeify.split.methods import repair

    g = torch.Generator().manual_seed(9)
    hidden, m, experts, tokens, ridge = 12, 6, 5, 300, 0.3
    moe = _random_moe(g, hidden, m, experts)
    x = torch.randn(tokens, hidden, generator=g)
    target = torch.randn(tokens, hidden, generator=g)
    choices = torch.topk(torch.randn(tokens, experts, generator=g), 2, dim=-1).indices
    joined, sizes = repair.neuron_blocks(moe)
    got = repair._refit_in_neuron_space(joined, sizes, experts, x, target, choices, ridge, 64, None)
    a = (repair.ffn_activations(joined, x) * repair.active_mask(choices, sizes, experts)).double()
    gram = a.T @ a
    lam = ridge * gram.diagonal().mean()
    want = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64),
                              a.T @ target.double() + lam * joined.down.T.double()).T
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_spd_solve_reads_one_triangle_and_mirrors_it_for_the_fallback():
    from moeify.split.methods.repair import _spd_solve

    g = torch.Generator().manual_seed(2)
    q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    b = torch.randn(6, 2, generator=g, dtype=torch.float64)
    for eigen in (torch.arange(1.0, 7.0), torch.tensor([3.0, -1.0, 2.0, 0.5, 4.0, -2.0])):  # SPD, then indefinite
        full = q @ torch.diag(eigen.double()) @ q.T
        upper_only = full.triu() + torch.full((6, 6), 1e3, dtype=torch.float64).tril(-1)  # garbage below
        torch.testing.assert_close(_spd_solve(upper_only, b, upper=True), torch.linalg.solve(full, b))


@pytest.mark.parametrize("tokens", [40, 200])  # fewer tokens than hidden dimensions: the tokens x tokens route
def test_router_fit_is_the_same_ridge_solution_by_either_route(tokens):
    from moeify.split.methods.router import fit_linear_router

    g = torch.Generator().manual_seed(3)
    hidden, experts = 96, 6
    x = torch.randn(tokens, hidden, generator=g)
    targets = torch.rand(tokens, experts, generator=g)
    got = fit_linear_router(x, targets, ridge=0.1)
    xd, t = x.double(), targets.double()
    t = t - t.mean(dim=1, keepdim=True)
    gram = xd.T @ xd
    want = torch.linalg.solve(gram + 0.1 * gram.diagonal().mean() * torch.eye(hidden, dtype=torch.float64), xd.T @ t)
    want = want.T.float()
    want = want / (x @ want.T).std()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
