"""The masked dense experts forward used in training equals transformers' own experts forward: logits and
every gradient (experts, routers), in float64, on Mixtral and Qwen2-MoE splits (tolerance 1e-10 relative)."""

from __future__ import annotations

import pytest
import torch

from moeify.finetune.masked_experts import use_masked_experts
from moeify.finetune.moe_model import load_student, moe_blocks
from moeify.split.convert import SplitOptions, split_model

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def split_moes(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    out = {}
    for name, experts, top_k, shared in (("mixtral", 6, 2, 0), ("qwen2_moe", 5, 2, 1)):
        out[name] = root / name
        split_model(tiny_models["llama"], out[name], SplitOptions(experts=experts, top_k=top_k, shared=shared,
                                                                  method="weights"))
    return out


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.square().mean() + logits[..., :7].sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_masked_experts_match_the_reference_loop_forward_and_gradients(split_moes, arch):
    model = load_student(split_moes[arch]).double()
    model.config._experts_implementation = "eager"  # transformers' reference loop (grouped_mm has no float64)
    with torch.no_grad():  # sharpen the routers so the top-k choice and weights differ between tokens
        for block in moe_blocks(model):
            block.router.log_scale.fill_(0.0)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    stock_logits, stock_grads = _logits_and_grads(model, ids)
    # tokens chose different experts, so the mask really selects per token
    assert all(b.router.last_indices.unique().numel() > b.router.top_k for b in moe_blocks(model))
    assert use_masked_experts(model) == model.config.num_hidden_layers
    masked_logits, masked_grads = _logits_and_grads(model, ids)

    scale = stock_logits.abs().max()
    assert (masked_logits - stock_logits).abs().max() <= 1e-10 * scale
    assert set(masked_grads) == set(stock_grads)
    expert_grads = [n for n in stock_grads if "experts." in n and "shared" not in n]
    router_grads = [n for n in stock_grads if "gate.weight_unit" in n]
    assert expert_grads and router_grads
    for name, grad in stock_grads.items():
        err = (masked_grads[name] - grad).abs().max()
        assert err <= 1e-10 * max(grad.abs().max(), 1e-30), (name, err.item())
