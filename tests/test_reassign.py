"""Router-aware reassignment: balanced partitions, never a worse held-out share, a lower held-out layer error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moeify.split.methods.activations import ActivationsMethod
from moeify.split.methods.reassign import captured_share, group_output_norms, reassign
from moeify.split.methods.refine import RefineSettings, heldout_split
from moeify.split.methods.repair import moe_output, relative_error
from moeify.split.methods.router import LinearRouterFit, fit_linear_router
from tests.test_refine import CHUNK, _ffn_and_inputs


def _method(rounds: int, neurons: int = 64) -> ActivationsMethod:
    m = ActivationsMethod()
    m.refine_steps, m.reassign_rounds, m.chunk_len = 0, rounds, CHUNK
    m.ctx = SimpleNamespace(experts=8, shared=0, expert_size=neurons // 8, top_k=2, seed=0)
    return m


def _heldout_error(moe, x, y, top_k=2):
    _, held = heldout_split(x.shape[0], CHUNK, RefineSettings(1).holdout)
    chosen = torch.topk(x[held] @ moe.router.T, top_k, dim=-1).indices
    return relative_error(moe_output(moe, x[held], chosen), y[held])


def test_rounds_give_a_balanced_partition_and_never_a_worse_heldout_share():
    ffn, x = _ffn_and_inputs()
    acts = ffn.activations(x)
    routed = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    groups = [routed[8 * e:8 * (e + 1)].sort().values for e in range(8)]  # a random grouping to improve on
    fit, held = heldout_split(x.shape[0], CHUNK, RefineSettings(1).holdout)
    result = reassign(groups, routed, acts, ffn.down, x, 2, 8, 5, fit, held, 1e-3)
    assert sorted(torch.cat(result.groups).tolist()) == list(range(64))
    assert all(len(g) == 8 for g in result.groups)
    assert all(torch.equal(g, g.sort().values) for g in result.groups)
    assert result.shares[result.kept] == max(result.shares)
    assert result.kept >= 1 and result.shares[result.kept] > result.shares[0]  # a random grouping is beaten
    assert len(result.shares) <= 6
    dropped = reassign([g[:6] for g in groups], routed, acts, ffn.down, x, 2, 8, 2, fit, held, 1e-3)
    assert sorted(torch.cat(dropped.groups).tolist()) == sorted(torch.cat([g[:6] for g in groups]).tolist())
    # the reported share is the returned groups' own, recomputed from scratch on the held-out tokens
    router = fit_linear_router(x[fit.start:fit.stop:2], group_output_norms(acts[fit.start:fit.stop:2], ffn.down,
                                                                            result.groups))
    chosen = torch.topk(x[held] @ router.T, 2, dim=-1).indices
    weight = ffn.down.pow(2).sum(0)
    energy = torch.stack([(acts[held][:, g].pow(2) * weight[g]).sum(1) for g in result.groups], dim=1)
    assert captured_share(chosen, energy) == pytest.approx(result.shares[result.kept], abs=1e-5)


def test_reassignment_lowers_the_heldout_error_of_the_split_layer():
    """The whole closed-form layer (router refit, ridge repair) on held-out sequences, against no reassignment."""
    errors = []
    for seed in range(3):
        ffn, x = _ffn_and_inputs(seed=seed)
        y = ffn.forward(x)
        plain, _, _ = _method(0).split_layer(0, ffn, x)
        moved, _, info = _method(3).split_layer(0, ffn, x)
        assert info["reassign_kept"] >= 0 and len(info["reassign_shares"]) >= 2
        errors.append((_heldout_error(plain, x, y), _heldout_error(moved, x, y)))
    assert sum(after for _, after in errors) < sum(before for before, _ in errors), errors


def test_the_router_fit_factored_once_matches_the_one_off_fit():
    g = torch.Generator().manual_seed(3)
    for tokens, hidden in ((300, 16), (10, 40)):  # neuron space and the tokens x tokens route
        x, t = torch.randn(tokens, hidden, generator=g), torch.randn(tokens, 5, generator=g)
        fit = LinearRouterFit(x, 1e-3)
        assert torch.allclose(fit.fit(t), fit_linear_router(x, t, 1e-3))
        assert torch.allclose(fit.fit(2 * t + 1), fit_linear_router(x, t, 1e-3), atol=1e-5)  # centred, unit spread
