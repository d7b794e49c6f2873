"""`--dense-layers auto`: a screening pass ranks layers by split error, the worst stay dense within the budget."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from moeify.cli import app
from moeify.errors import UsageError
from moeify.split import dense_auto
from moeify.split.convert import SplitOptions, _resolve_dense_auto, plan_split, split_model
from moeify.split.dense_auto import DenseRequest, dense_count_rule, max_dense, moe_ratio, parse_dense_layers
from tests.char_tokenizer import add_char_tokenizer
from tests.tiny_models import _randomize

runner = CliRunner()
FAST = dict(calibration_tokens=512, refine_steps=0, dtype="float32")  # tiny models: seconds per split


def _tiny_llama(folder, layers: int = 8, intermediate: int = 128, tokenizer: bool = True):
    config = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    _randomize(LlamaForCausalLM(config), seed=3).save_pretrained(folder, safe_serialization=True)
    return add_char_tokenizer(folder) if tokenizer else folder


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("auto") / "llama8")


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- the rule and the budget (pure) ------------------------------------------------------------------


def test_parse_dense_layers_forms():
    assert parse_dense_layers([3, 1, 3]) == [1, 3]
    assert parse_dense_layers("auto") == DenseRequest(None)
    assert parse_dense_layers("auto:4") == DenseRequest(4)
    for bad in ("automatic", "auto:", "auto:-1", "1,2", [True], 3):
        with pytest.raises(UsageError, match="auto or auto:N"):
            parse_dense_layers(bad)


def test_rule_keeps_outliers_within_the_caps():
    assert dense_count_rule([0.1] * 8, 0.5) == 0  # layers that split alike: none dense
    assert dense_count_rule([0.1] * 7 + [0.5], 0.5) == 1
    assert dense_count_rule([0.1] * 4 + [0.5] * 4, 0.5) == max_dense(8, 0.5) == 2  # a quarter of 8
    assert max_dense(30, 0.5) == 7 and max_dense(30, 0.25) == 4  # r' >= r/2 binds at 25%: D <= 30*.25/1.75
    for layers, r in ((30, 0.5), (30, 0.25), (12, 0.1)):
        d = max_dense(layers, r)
        assert moe_ratio(r, layers, d) >= r / 2 - 1e-9
    assert max_dense(8, None) == 2  # a layout fixed by the user: only the quarter


def test_forced_count_beyond_the_budget_is_refused():
    with pytest.raises(UsageError, match="activation budget"):
        dense_auto.check_request(DenseRequest(5), 8, 0.5)  # 5 full layers of 8 > 50% of the model
    with pytest.raises(UsageError, match="every layer"):
        dense_auto.check_request(DenseRequest(8), 8, None)
    dense_auto.check_request(DenseRequest(3), 8, 0.5)


# --- the choice on real plans (screening replaced by known errors) -------------------------------------


@pytest.mark.parametrize("layers,intermediate,active,request_,errors,chosen", [
    (8, 128, 0.5, "auto", [0.1, 0.1, 0.9, 0.1, 0.1, 0.1, 0.6, 0.1], [2, 6]),
    (8, 256, 0.25, "auto", [0.1, 0.1, 0.9, 0.1, 0.1, 0.1, 0.6, 0.1], [2]),  # r' >= r/2 caps it at one
    (12, 192, 0.5, "auto:3", [0.2, 0.3, 0.1, 0.5, 0.2, 0.2, 0.4, 0.2, 0.2, 0.2, 0.6, 0.2], [3, 6, 10]),
    (12, 192, 0.5, "auto", [0.2] * 12, []),
])
def test_choice_and_whole_model_ratio(tmp_path, monkeypatch, layers, intermediate, active, request_, errors, chosen):
    folder = _tiny_llama(tmp_path / "m", layers, intermediate, tokenizer=False)
    monkeypatch.setattr(dense_auto, "screen_layers", lambda plan, options, reporter, compute: (errors, 512))
    options = SplitOptions(active=active, dense_layers=request_)
    base = plan_split(folder, options)
    assert base.target_plan.dense_layers == []  # planned without dense layers until the screen has chosen
    plan, choice = _resolve_dense_auto(base, options, None, None)
    assert choice.layers == chosen == plan.target_plan.dense_layers == plan.options.dense_layers
    assert plan.options.active == active  # the user's request is what moeify.json records
    assert choice.moe_ratio == pytest.approx((layers * active - len(chosen)) / (layers - len(chosen)))
    expert_share = plan.target_plan.expert_size / intermediate
    assert abs(plan.activation_ratio - active) <= expert_share, (plan.activation_ratio, plan.layout_why)
    assert ("kept layer" in plan.layout_why) == bool(chosen) and "total" in plan.layout_why


def test_fixed_layout_is_kept_and_says_the_budget_grew(tmp_path, monkeypatch):
    folder = _tiny_llama(tmp_path / "m", tokenizer=False)
    monkeypatch.setattr(dense_auto, "screen_layers", lambda *a: ([0.1] * 7 + [0.9], 512))
    options = SplitOptions(experts=6, top_k=2, shared=2, target="qwen2_moe", dense_layers="auto")
    plan, choice = _resolve_dense_auto(plan_split(folder, options), options, None, None)
    p = plan.target_plan
    assert (p.experts, p.top_k, p.shared, p.dense_layers) == (6, 2, 2, [7]) and choice.moe_ratio is None
    assert plan.activation_ratio > 0.5 and "add to its share" in plan.layout_why


# --- the real screening pass -------------------------------------------------------------------------


def test_auto_0_is_the_default_split_and_screens_with_the_methods_own_error(llama8, tmp_path):
    plain = split_model(llama8, tmp_path / "plain", SplitOptions(**FAST))
    auto = split_model(llama8, tmp_path / "auto0", SplitOptions(dense_layers="auto:0", **FAST))
    a, b = _tensors(tmp_path / "plain"), _tensors(tmp_path / "auto0")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    record = auto["dense_layers_auto"]
    assert record["chosen"] == [] and auto["dense_layers"] == []
    assert record["screening"] == {"method": "activations", "calibration_tokens": 512, "refine_steps": 0,
                                   "stream": "dense"}
    # The screen (min(4096, 512) tokens, no refinement, each layer on dense inputs) is this very split with
    # --stream dense: the method's own per-layer numbers, not a second metric.
    isolated = split_model(llama8, tmp_path / "isolated", SplitOptions(stream="dense", **FAST))
    assert record["screened_errors"] == [layer["error_after_repair"] for layer in isolated["layers"]]
    assert plain["method_info"]["stream"] == "compensate"


def test_auto_keeps_the_highest_screened_layers_dense(llama8, tmp_path):
    result = split_model(llama8, tmp_path / "moe", SplitOptions(dense_layers="auto:2", **FAST))
    record = result["dense_layers_auto"]
    errors = record["screened_errors"]
    assert len(errors) == 8 and all(e > 0 for e in errors)
    top = sorted(range(8), key=lambda i: -errors[i])[:2]
    assert record["chosen"] == sorted(top) == result["dense_layers"] == result["options"]["dense_layers"]
    assert all(result["layers"][i].get("dense") for i in top)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["mlp_only_layers"] == sorted(top)
    assert abs(result["activation_ratio"] - 0.5) <= result["expert_size"] / 128


def test_auto_picks_a_layer_made_hard_to_split(tmp_path):
    """In every layer but 3, only 32 neurons write to the output (the shared block holds them: an easy split);
    layer 3 spreads its output over all 128. Layer 3 is the one `auto` keeps dense."""
    folder = _tiny_llama(tmp_path / "m")
    from safetensors.torch import save_file

    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    for i in range(8):
        if i != 3:
            tensors[f"model.layers.{i}.mlp.down_proj.weight"][:, 32:] = 0
    save_file(tensors, shard, metadata={"format": "pt"})
    result = split_model(folder, tmp_path / "moe", SplitOptions(dense_layers="auto", **FAST))
    errors = result["dense_layers_auto"]["screened_errors"]
    assert result["dense_layers"] == [3], errors


def test_cli_prints_the_choice_and_records_no_local_paths(llama8, tmp_path):
    out = tmp_path / "moe"
    r = runner.invoke(app, ["split", str(llama8), "--dense-layers", "auto:2", "--calibration-tokens", "512",
                            "--refine-steps", "0", "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stderr.splitlines() if "--dense-layers auto:2" in x)
    assert "kept layers" in line and "median" in line and "total" in line
    assert "dense layers" in r.stdout and "activation ratio" in r.stdout
    meta = json.loads((out / "moeify.json").read_text())
    record = next(v for v in _walk(meta) if isinstance(v, dict) and "screened_errors" in v)
    assert str(tmp_path) not in json.dumps(record) and len(record["chosen"]) == 2


def _walk(obj):
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["-e", "4", "-k", "2", "--dense-layers", "auto"], "mixtral (MixtralForCausalLM) cannot"),
    (["--target", "mixtral", "--shared", "0", "--dense-layers", "auto:2"], "cannot"),
    (["--method", "weights", "--dense-layers", "auto"], "--method weights"),
    (["--dense-layers", "auto:7"], "activation budget"),
    (["--dense-layers", "automatic"], "auto or auto:N"),
])
def test_refusals_are_one_line_exit_2_and_write_nothing(llama8, tmp_path, args, message):
    r = runner.invoke(app, ["split", str(llama8), *args, "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".moeify-tmp-*"))


def test_recipe_accepts_auto_and_rejects_other_words(llama8):
    from moeify.pipeline.checks import check_recipe
    from moeify.pipeline.recipe import parse_recipe

    for value in ("auto", "auto:2"):
        recipe = parse_recipe(f"model: {llama8}\noutput: /tmp/x\nsplit:\n  dense_layers: {value}\n")
        assert recipe.options("split")["dense_layers"] == value
        check_recipe(recipe, fetch_config=False)
    bad = parse_recipe(f"model: {llama8}\noutput: /tmp/x\nsplit:\n  dense_layers: automatic\n", "r.yaml")
    with pytest.raises(UsageError, match=r"split\.dense_layers 'automatic'"):
        check_recipe(bad, fetch_config=False)
    mixtral = parse_recipe(f"model: {llama8}\noutput: /tmp/x\nsplit:\n  experts: 4\n  top_k: 2\n"
                           "  dense_layers: auto\n", "r.yaml")
    with pytest.raises(UsageError, match="keeps layers dense"):
        check_recipe(mixtral, fetch_config=False)
