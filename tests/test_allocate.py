"""Layout rules: `--active` gives the requested share of the FFN, and the defaults are the measured best."""

from __future__ import annotations

import pytest

from moeify.errors import UsageError
from moeify.split.allocate import allocate
from moeify.split.convert import SplitOptions, activation_ratio, plan_target


def _config(intermediate: int, layers: int = 4) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512}


@pytest.mark.parametrize("intermediate", [96, 1536, 8192, 11008, 14336])
@pytest.mark.parametrize("active", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("experts", [None, 8, 16, 60])
def test_active_gives_the_requested_ratio_within_one_expert(intermediate, active, experts):
    if experts is not None and experts >= intermediate // 2:
        pytest.skip("more experts than this FFN can hold with shared ones")
    _, plan = plan_target(_config(intermediate), SplitOptions(experts=experts, active=active))
    blocks = plan.experts + plan.shared
    measured = activation_ratio(plan, 4, intermediate)
    # one expert's share of the FFN, plus the zero padding that rounds experts up to a multiple of 8 neurons
    tolerance = 1 / blocks + (plan.expert_size * blocks - intermediate) / intermediate
    assert abs(measured - active) <= tolerance + 1e-9, (plan, measured)
    assert plan.shared >= 1  # shared experts are on by default: the largest measured win
    assert 1 <= plan.top_k <= plan.experts


def test_default_is_the_best_measured_layout():
    # SmolLM2-135M's FFN: 48 routed top-16 + 16 shared (docs/quality.md's best 50% row), not 8 top-2.
    a = allocate(1536)
    assert (a.experts, a.top_k, a.shared) == (48, 16, 16)
    assert "50%" in a.why
    a = allocate(1536, experts=8)
    assert a.shared >= 1 and 0.4 <= a.ratio() <= 0.6
    a = allocate(1536, active=0.25)
    assert a.shared >= 1 and a.ratio() == 0.25


def test_explicit_layouts_are_honoured():
    for a in (allocate(1536, experts=8, top_k=2), allocate(1536, experts=8, top_k=2, shared=0)):
        assert (a.experts, a.top_k, a.shared) == (8, 2, 0)
    a = allocate(1536, experts=7, top_k=1, active=0.25)  # --active fills in the shared experts
    assert a.top_k == 1 and abs(a.ratio() - 0.25) <= 1 / (a.experts + a.shared)


@pytest.mark.parametrize("kwargs", [dict(active=0.0), dict(active=1.5), dict(active=0.5, top_k=2, shared=1),
                                    dict(experts=0)])
def test_impossible_requests_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        allocate(1536, **kwargs)


def test_split_with_active_plans_and_records_the_choice(tiny_models):
    from moeify.split.convert import plan_split

    plan = plan_split(tiny_models["llama"], SplitOptions(active=0.25))  # plan_split resolves, plan_target must not
    assert plan.options.active == 0.25 and None not in (plan.options.experts, plan.options.top_k, plan.options.shared)
    assert "asked 25%" in plan.layout_why
