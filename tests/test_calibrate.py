"""Layer-by-layer calibration equals the full model, and the neuron statistics equal a direct computation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeify.io.reader import CheckpointReader, load_json
from moeify.split.calibrate import FIRE_FRACTION, LayerRunner, NeuronStats, calibration_tokens, ffn_activations
from moeify.split.moe_layer import FFNWeights
from tests.char_tokenizer import add_char_tokenizer


def _ffn(reader: CheckpointReader, layer: int) -> FFNWeights:
    p = f"model.layers.{layer}.mlp."
    return FFNWeights(*(reader.get(p + k + "_proj.weight", torch.float32) for k in ("gate", "up", "down")))


def _hooked_ffn_io(folder, tokens):
    """FFN inputs and activations of every layer from one full forward pass with hooks (the reference)."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]))) for i, layer in
        enumerate(model.model.layers)]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    acts = {i: (model.model.layers[i].mlp.act_fn(model.model.layers[i].mlp.gate_proj(x))
                * model.model.layers[i].mlp.up_proj(x)).detach() for i, x in inputs.items()}
    return inputs, acts


# mistral has sliding_window=16 here, so 40-token chunks exercise the sliding mask; qwen3 has q/k norms.
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
def test_layer_runner_matches_full_model(tiny_models, name):
    folder = tiny_models[name]
    reader = CheckpointReader(folder)
    tokens = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    runner = LayerRunner(folder, reader, load_json(folder / "config.json", "config"), tokens, batch=2)
    inputs, _ = _hooked_ffn_io(folder, tokens)
    for i in range(runner.layers):
        x = runner.ffn_input(i)
        torch.testing.assert_close(x, inputs[i], rtol=1e-5, atol=1e-5)
        runner.advance(_ffn(reader, i).forward(x))


def test_neuron_stats_match_direct_computation(tiny_models):
    folder = tiny_models["llama"]
    reader = CheckpointReader(folder)
    tokens = torch.randint(0, 128, (2, 50), generator=torch.Generator().manual_seed(1))
    inputs, acts = _hooked_ffn_io(folder, tokens)
    ffn = _ffn(reader, 1)
    torch.testing.assert_close(ffn_activations(ffn, inputs[1]), acts[1], rtol=1e-5, atol=1e-6)
    stats = NeuronStats.from_activations(acts[1], ffn.down, chunk=7)  # chunking must not change anything
    a = acts[1].double().abs()
    contribution = a * ffn.down.double().norm(dim=0)
    top = round(FIRE_FRACTION * a.shape[1])
    fired = torch.zeros_like(contribution)
    for t in range(a.shape[0]):
        fired[t, torch.argsort(contribution[t], descending=True)[:top]] = 1
    assert stats.tokens == 100
    torch.testing.assert_close(stats.mean_abs.double(), a.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.mean_contribution.double(), contribution.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.fire_rate.double(), fired.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(stats.coactivation.double(), fired.T @ fired / 100, rtol=0, atol=1e-6)
    assert torch.allclose(stats.coactivation.diagonal(), stats.fire_rate)


def test_calibration_tokens_are_fixed_chunks(tiny_models, tmp_path):
    folder = add_char_tokenizer(tiny_models["llama"], copy_to=tmp_path / "dense")
    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged. " * 100)
    tokens = calibration_tokens(folder, str(text), max_tokens=1000, seq_len=256)
    assert tokens.shape == (3, 256)
    default = calibration_tokens(folder, None, max_tokens=512, seq_len=128)  # shipped mixed text
    assert default.shape == (4, 128)


def test_calibration_chunks_span_the_whole_corpus(tiny_models, tmp_path):
    """A corpus of two texts back to back: a small token budget still samples both, evenly."""
    folder = add_char_tokenizer(tiny_models["llama"], copy_to=tmp_path / "dense")
    text = tmp_path / "two-texts.txt"
    text.write_text("a" * 4000 + "b" * 4000)
    tokens = calibration_tokens(folder, str(text), max_tokens=4 * 100, seq_len=100)
    ids = {int(v) for v in tokens.unique()}
    assert tokens.shape == (4, 100) and len(ids) == 2  # both letters, not just the first text's
    assert (tokens[:2] == tokens[0, 0]).all() and (tokens[2:] == tokens[-1, -1]).all()  # 2 chunks from each

    default = calibration_tokens(folder, None, max_tokens=2 * 128, seq_len=128)  # shipped: a novel, then Wikipedia
    assert not torch.equal(default[0], default[-1])
    whole = calibration_tokens(folder, None, max_tokens=10**9, seq_len=128)
    assert torch.equal(default[0], whole[0]) and torch.equal(default[-1], whole[-1])  # first and last chunk
