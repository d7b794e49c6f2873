"""Layer-local refinement: it lowers the held-out error of a split layer, and never raises it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

import moeify.split.methods.activations as act
from moeify.split.convert import SplitOptions, split_model
from moeify.split.methods.activations import ActivationsMethod
from moeify.split.methods.refine import RefineSettings, heldout_split, refine_layer
from moeify.split.methods.repair import moe_output, refit_down, relative_error
from moeify.split.moe_layer import FFNWeights
from tests.char_tokenizer import add_char_tokenizer

CHUNK = 128


def _ffn_and_inputs(tokens: int = 4096, hidden: int = 32, neurons: int = 64, seed: int = 0):
    """A random SwiGLU FFN and inputs with some structure (a few dominant directions)."""
    g = torch.Generator().manual_seed(seed)
    ffn = FFNWeights(torch.randn(neurons, hidden, generator=g) / hidden**0.5,
                     torch.randn(neurons, hidden, generator=g) / hidden**0.5,
                     torch.randn(hidden, neurons, generator=g) / neurons**0.5)
    basis = torch.randn(4, hidden, generator=g)
    x = torch.randn(tokens, 4, generator=g) @ basis + 0.3 * torch.randn(tokens, hidden, generator=g)
    return ffn, x


def _method(refine_steps: int = 0, neurons: int = 64, **settings) -> ActivationsMethod:
    """The activations method splitting 8 top-2, calibrated on sequences of CHUNK tokens."""
    m = ActivationsMethod()
    m.refine_steps, m.chunk_len = refine_steps, CHUNK
    for key, value in settings.items():
        setattr(m, key, value)
    m.ctx = SimpleNamespace(experts=8, shared=0, expert_size=neurons // 8, top_k=2, seed=0)
    return m


def _layer(seed: int = 0):
    """The layer split 8 top-2 by the closed-form steps alone (the method's own refinement off, so the tests
    start from the unrefined layer)."""
    ffn, x = _ffn_and_inputs(seed=seed)
    moe, y, _ = _method().split_layer(0, ffn, x)
    return moe, x, y


def _heldout_error(moe, x, y, top_k=2):
    _, held = heldout_split(x.shape[0], CHUNK, RefineSettings(1).holdout)
    xh, yh = x[held], y[held]
    chosen = torch.topk(xh @ moe.router.T, top_k, dim=-1).indices
    return relative_error(moe_output(moe, xh, chosen), yh)


def test_refinement_lowers_the_heldout_error():
    moe, x, y = _layer()
    before = _heldout_error(moe, x, y)
    refined, info = refine_layer(moe, x, y, 2, RefineSettings(steps=150, lr=3e-3), CHUNK)
    assert info["refined"] is True
    assert info["error_heldout_before_refine"] == round(before, 5)
    after = _heldout_error(refined, x, y)
    assert abs(after - info["error_heldout_after_refine"]) < 1e-4  # the reported figure is the written layer's
    assert after < 0.95 * before, (before, after)
    # padding and shapes are untouched: same expert sizes, router still unit-spread
    assert [e.size for e in refined.experts] == [e.size for e in moe.experts]
    assert abs(float((x @ refined.router.T).std()) - 1.0) < 1e-3


def test_refinement_that_does_not_help_keeps_the_closed_form_layer():
    moe, x, y = _layer(seed=1)
    before = _heldout_error(moe, x, y)
    kept, info = refine_layer(moe, x, y, 2, RefineSettings(steps=30, lr=3.0), CHUNK)  # a step size that diverges
    assert info["refined"] is False
    assert info["error_heldout_after_refine"] >= info["error_heldout_before_refine"]
    assert kept is moe
    assert _heldout_error(kept, x, y) == before


def test_refinement_is_judged_against_a_closed_form_that_never_saw_the_heldout_sequences():
    """The repair fits every calibration token when refinement is off; when it is on, the closed form
    refinement must beat is fitted on the training sequences only (else its held-out error is in-sample and
    good refinements are refused), and where refinement loses, the closed form on every token is written."""
    ffn, x = _ffn_and_inputs(seed=1)
    closed_all, y, _ = _method().split_layer(0, ffn, x)
    unrepaired, _, _ = _method(repair=False).split_layer(0, ffn, x)
    train, held = heldout_split(x.shape[0], CHUNK, RefineSettings(1).holdout)
    chosen = torch.topk(x @ unrepaired.router.T, 2, dim=-1).indices
    closed_train = refit_down(unrepaired, x[train], y[train], chosen[train], ActivationsMethod.down_ridge)
    in_sample, out_of_sample = _heldout_error(closed_all, x, y), _heldout_error(closed_train, x, y)
    assert out_of_sample > in_sample  # the bias the fair comparison removes

    refused, _, info = _method(refine_steps=30, refine_lr=3.0).split_layer(0, ffn, x)  # a step size that diverges
    assert info["refined"] is False
    assert abs(info["error_heldout_before_refine"] - out_of_sample) < 2e-5  # judged against the fair baseline
    for written, expected in zip(refused.experts, closed_all.experts, strict=True):  # and the full fit written
        torch.testing.assert_close(written.down, expected.down, rtol=1e-5, atol=1e-6)

    kept, _, info = _method(refine_steps=150, refine_lr=3e-3).split_layer(0, ffn, x)
    assert info["refined"] is True
    assert abs(info["error_heldout_before_refine"] - out_of_sample) < 2e-5
    assert _heldout_error(kept, x, y) < out_of_sample


def test_heldout_tokens_are_whole_sequences():
    train, held = heldout_split(16 * CHUNK, CHUNK, 0.125)
    assert (train.stop, held.start, held.stop) == (14 * CHUNK, 14 * CHUNK, 16 * CHUNK)
    train, held = heldout_split(100, 512, 0.125)  # one short sequence: its tail is held out
    assert 0 < train.stop < 100 and held.stop == 100


def test_split_records_refinement_per_layer(tiny_models, tmp_path):
    src = add_char_tokenizer(tiny_models["llama"], copy_to=tmp_path / "src")
    out = tmp_path / "moe"
    # 4096 calibration tokens: with 1024 the held-out eighth is too small and 20-50 steps help no layer there
    result = split_model(src, out, SplitOptions(experts=4, top_k=1, shared=1, refine_steps=50, refine_batch=64,
                                                calibration_tokens=4096))
    layers = json.loads((out / "moeify.json").read_text())["stages"]["split"]["layers"]
    assert len(layers) == 2
    for layer in layers:
        assert layer["refine_steps"] == 50
        before, after = layer["error_heldout_before_refine"], layer["error_heldout_after_refine"]
        assert before > 0
        # keep-if-better: the refined layer is written only when it lowered the held-out error, else the closed
        # form is kept (the recorded `after` is then the discarded attempt's). The figures are rounded to 5
        # decimals after the comparison, and rounding is monotonic, so the checks hold with no other tolerance.
        assert (after <= before) if layer["refined"] else (after >= before), layer
    # and refinement does help here: at least one layer is written refined, its held-out error at least 0.5%
    # lower (measured: layer 0 0.2648 -> 0.2616, 1.2%; layer 1 is kept, its attempt was worse)
    assert any(layer["refined"] and layer["error_heldout_after_refine"] <= 0.995 * layer["error_heldout_before_refine"]
               for layer in layers), layers
    assert result["options"]["refine_steps"] == 50


def test_ctrl_c_during_refinement_leaves_no_output(tiny_models, tmp_path, monkeypatch):
    """Refinement runs inside the split's atomic output: interrupted there, nothing is left that looks done."""
    import pytest

    from moeify.split.methods import activations
    from tests.hostile import leftovers

    src = add_char_tokenizer(tiny_models["llama"], copy_to=tmp_path / "src")
    calls = {"n": 0}
    real = activations.refine_layer

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second layer: the first one's tensors are already written
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "refine_layer", interrupted)
    out = tmp_path / "moe"
    with pytest.raises(KeyboardInterrupt):
        split_model(src, out, SplitOptions(experts=4, top_k=1, shared=1, refine_steps=5, calibration_tokens=512))
    assert calls["n"] == 2
    assert not out.exists()
    assert leftovers(out) == []


def test_a_winning_refinement_gets_its_down_projections_refitted_on_every_calibration_token(monkeypatch):
    """Refinement trains on the training sequences only; the ridge repair after it fits all of them, so the
    shipped layer's error on the calibration tokens is below the refined layer's (the ridge objective is at
    most its value at the refined down projections, which it is pulled towards)."""
    seen = {}
    refine = act.refine_layer

    def spy(*args, **kwargs):
        seen["refined"], info = refine(*args, **kwargs)
        return seen["refined"], info

    monkeypatch.setattr(act, "refine_layer", spy)
    ffn, x = _ffn_and_inputs()
    y = ffn.forward(x)
    moe, _, info = _method(refine_steps=150, refine_lr=3e-3).split_layer(0, ffn, x)
    assert info["refined"] is True

    def error(layer):
        return relative_error(moe_output(layer, x, torch.topk(x @ layer.router.T, 2, dim=-1).indices), y)

    assert torch.equal(moe.router, seen["refined"].router)  # the routing refinement learnt is kept
    assert error(moe) < error(seen["refined"]) - 1e-3
