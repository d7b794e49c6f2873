"""Recipes: strict loading (field and line in every error), typed overrides, shipped recipes, model checks."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from moeify.errors import InputError, UsageError
from moeify.pipeline.checks import check_model_config, check_recipe
from moeify.pipeline.recipe import (
    MAX_RECIPE_BYTES,
    find_recipe,
    load_recipe,
    parse_recipe,
    recipe_header,
    recipe_model,
    shipped_recipes,
    stage_fields,
)
from moeify.split.convert import SplitOptions

GOOD = """\
model: ./some-model
output: ./out
split:
  experts: 8
  top_k: 2
quantize:
  scheme: channel
"""


def test_defaults_come_from_the_stage_definitions():
    recipe = parse_recipe(GOOD)
    split = recipe.options("split")
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(SplitOptions)}
    assert set(split) == set(defaults)
    assert {k: v for k, v in split.items() if k not in ("experts", "top_k")} == \
        {k: v for k, v in defaults.items() if k not in ("experts", "top_k")}
    assert recipe.stages() == ["split", "quantize"]
    assert recipe.options("quantize")["verify"] is True


def test_unknown_key_names_field_line_and_suggestion():
    text = GOOD.replace("  top_k: 2", "  top_k: 2\n  exprets: 4")
    with pytest.raises(InputError) as e:
        parse_recipe(text, "r.yaml")
    assert "r.yaml:6: unknown key split.exprets" in e.value.message
    assert "did you mean split.experts" in e.value.hint


def test_unknown_top_level_key():
    with pytest.raises(InputError) as e:
        parse_recipe(GOOD + "quantise:\n  scheme: block\n", "r.yaml")
    assert "r.yaml:8: unknown key quantise" in e.value.message
    assert "quantize" in e.value.hint


def test_wrong_type_names_field_line_and_value():
    with pytest.raises(InputError) as e:
        parse_recipe(GOOD.replace("experts: 8", "experts: eight"), "r.yaml")
    assert e.value.message.startswith("r.yaml:4: split.experts: Input should be a valid integer")
    assert "'eight'" in e.value.message


def test_unknown_choice_lists_valid_ones():
    with pytest.raises(InputError) as e:
        parse_recipe(GOOD.replace("scheme: channel", "scheme: blok"), "r.yaml")
    assert "r.yaml:7: quantize.scheme" in e.value.message
    assert "'block'" in e.value.message and "'channel'" in e.value.message


def test_missing_required_key():
    with pytest.raises(InputError) as e:
        parse_recipe("model: x\nsplit: {}\n", "r.yaml")
    assert "required key output is missing" in e.value.message


def test_malformed_yaml_is_one_line_with_the_line():
    with pytest.raises(InputError) as e:
        parse_recipe("model: x\noutput: [a,\nsplit: {}\n", "r.yaml")
    assert e.value.message.startswith("r.yaml:")
    assert "malformed YAML" in e.value.message
    assert "\n" not in e.value.message


@pytest.mark.parametrize("text", ["a: &x [1, 2]\nb: *x\n", "model: &m x\noutput: y\n"])
def test_anchors_and_aliases_are_refused(text):
    with pytest.raises(InputError, match="anchors and aliases"):
        parse_recipe(text, "r.yaml")


def test_alias_bomb_is_refused_before_expansion():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    with pytest.raises(InputError, match="r.yaml:1: YAML anchors"):
        parse_recipe(bomb, "r.yaml")


def test_huge_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_RECIPE_BYTES + "\n" + GOOD)
    with pytest.raises(InputError, match="too large"):
        load_recipe(path)


def test_python_tags_are_not_constructed():
    with pytest.raises(InputError, match="malformed YAML"):
        parse_recipe("model: !!python/object/apply:os.system ['true']\noutput: x\n", "r.yaml")


def test_overrides_are_typed_and_named_in_errors():
    recipe = parse_recipe(GOOD, "r.yaml", ["split.experts=4", "split.dense_layers=[0, 1]", "quantize=null",
                                           "eval=null"])
    assert recipe.options("split")["experts"] == 4
    assert recipe.options("split")["dense_layers"] == [0, 1]
    assert recipe.stages() == ["split"]
    with pytest.raises(InputError) as e:
        parse_recipe(GOOD, "r.yaml", ["split.top_k=two"])
    assert "override 'split.top_k=two': split.top_k" in e.value.message
    with pytest.raises(InputError, match="unknown key split.expertz"):
        parse_recipe(GOOD, "r.yaml", ["split.expertz=3"])
    with pytest.raises(UsageError, match="not key.sub=value"):
        parse_recipe(GOOD, "r.yaml", ["split.experts"])


def test_resolved_recipe_round_trips():
    recipe = parse_recipe(GOOD, "r.yaml", ["split.experts=4"])
    again = parse_recipe(recipe.resolved_yaml(), "resolved.yaml")
    assert again.resolved() == recipe.resolved()


def test_missing_stage_module_is_a_clear_error(monkeypatch):
    from moeify.pipeline import stages

    fake = dataclasses.replace(stages.STAGES["finetune"], module="moeify._no_such_stage")
    monkeypatch.setitem(stages.STAGES, "finetune", fake)
    recipe_model.cache_clear()
    try:
        assert parse_recipe(GOOD).stages() == ["split", "quantize"]  # other recipes still load
        with pytest.raises(UsageError, match=r"r.yaml:8: the finetune stage is not available"):
            parse_recipe(GOOD + "finetune:\n  lr: 0.001\n", "r.yaml")
    finally:
        monkeypatch.undo()
        recipe_model.cache_clear()


def test_split_cli_defaults_match_the_recipe_defaults():
    """The split command and the recipe share SplitOptions: a default changed in one place changes both."""
    from moeify.cli.split_cmd import split

    recipe_defaults = stage_fields("split")
    for name, param in inspect.signature(split).parameters.items():
        if name in recipe_defaults and name != "dense_layers":
            assert param.default == recipe_defaults[name], name
    cli_only = {"model", "output", "revision", "token", "overwrite", "json_mode", "quiet", "dense_layers"}
    assert set(inspect.signature(split).parameters) - cli_only <= set(recipe_defaults)


def test_quantize_cli_defaults_match_the_recipe_defaults():
    from moeify.cli.quantize_cmd import quantize_command

    recipe_defaults = stage_fields("quantize")
    params = inspect.signature(quantize_command).parameters
    assert params["scheme"].default.value == recipe_defaults["scheme"]
    assert params["experts_only"].default == recipe_defaults["experts_only"]
    assert params["no_verify"].default is (not recipe_defaults["verify"])


# --- shipped recipes ------------------------------------------------------------------------------------

# Published config.json values of each shipped recipe's model (hidden, intermediate, layers, heads, kv heads,
# head_dim), so every recipe is checked against its real architecture without a download.
PUBLISHED = {
    "HuggingFaceTB/SmolLM2-135M": ("llama", 576, 1536, 30, 9, 3, 64),
    "HuggingFaceTB/SmolLM2-1.7B": ("llama", 2048, 8192, 24, 32, 32, 64),
    "meta-llama/Llama-3.2-1B": ("llama", 2048, 8192, 16, 32, 8, 64),
    "meta-llama/Llama-3.2-3B": ("llama", 3072, 8192, 28, 24, 8, 128),
    "meta-llama/Llama-3.1-8B": ("llama", 4096, 14336, 32, 32, 8, 128),
    "Qwen/Qwen2.5-0.5B": ("qwen2", 896, 4864, 24, 14, 2, 64),
    "Qwen/Qwen2.5-1.5B": ("qwen2", 1536, 8960, 28, 12, 2, 128),
    "Qwen/Qwen2.5-7B": ("qwen2", 3584, 18944, 28, 28, 4, 128),
    "Qwen/Qwen3-0.6B": ("qwen3", 1024, 3072, 28, 16, 8, 128),
    "Qwen/Qwen3-8B": ("qwen3", 4096, 12288, 36, 32, 8, 128),
    "mistralai/Mistral-7B-v0.3": ("mistral", 4096, 14336, 32, 32, 8, 128),
}


def _config(model: str) -> dict:
    model_type, hidden, inter, layers, heads, kv, head_dim = PUBLISHED[model]
    return {"model_type": model_type, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": head_dim, "vocab_size": 32000, "hidden_act": "silu"}


def test_every_model_family_is_shipped():
    models = {load_recipe(p).model for p in shipped_recipes().values()}
    assert models == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipe_validates_against_its_model(name):
    path = shipped_recipes()[name]
    recipe = load_recipe(path)
    header = recipe_header(path)
    assert f"Run it:       moeify run {name}" in header[2]
    config = _config(recipe.model)
    result = check_model_config(recipe, config)
    split = recipe.options("split")
    size = result.steps[0].estimate["expert_size"]
    assert 0.2 <= result.activation_ratio <= 0.5 + 1e-9, "shipped recipes run a quarter to half of the FFN"
    if config["model_type"] == "qwen3":
        assert split["shared"] == 0, "Qwen3-MoE has no shared experts"
    if split["shared"] and config["model_type"] in ("llama", "mistral"):
        assert result.steps[0].estimate["architecture"] == "Qwen2MoeForCausalLM"
    if recipe.options("quantize")["scheme"] == "block":
        q_dim, kv_dim = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * \
            config["head_dim"]
        for dim in (size, config["hidden_size"], q_dim, kv_dim):
            assert dim % 128 == 0, f"{name}: block FP8 needs multiples of 128, {dim} is not"
    assert find_recipe(name) == path


def test_impossible_expert_count_is_refused_against_the_config():
    recipe = load_recipe(shipped_recipes()["qwen3-0.6b-8x2-fp8"], ["split.experts=4000"])
    with pytest.raises(UsageError) as e:
        check_model_config(recipe, _config(recipe.model))
    assert "split:" in e.value.message and "4000 experts" in e.value.message
    assert "3072" in e.value.message


def test_block_scheme_on_odd_sizes_is_refused_against_the_config():
    recipe = load_recipe(shipped_recipes()["smollm2-135m-8x2-fp8"], ["quantize.scheme=block"])
    with pytest.raises(UsageError, match="quantize.scheme: block needs dimensions that are multiples of 128"):
        check_model_config(recipe, _config(recipe.model))


def test_validate_reads_headers_of_a_local_model(tmp_path):
    from tests.tiny_models import build

    tiny_models = {"llama": build("llama", tmp_path / "llama")}
    recipe = parse_recipe(f"model: {tiny_models['llama']}\noutput: {tmp_path / 'out'}\n"
                          "split:\n  experts: 500\n  shared: 0\n", "r.yaml")
    with pytest.raises(UsageError, match=r"r.yaml: split: 500 experts \+ 0 shared need more neurons"):
        check_recipe(recipe)
    ok = check_recipe(parse_recipe(f"model: {tiny_models['llama']}\noutput: {tmp_path / 'out'}\n"
                                   "split:\n  experts: 4\n  top_k: 1\n", "r.yaml"))
    assert "safetensors headers" in ok.checked_against
    assert ok.activation_ratio == pytest.approx(0.25)


def test_config_only_check_agrees_with_the_header_check(tmp_path):
    """validate without weights and validate with them run one planner: same target, expert size and ratio."""
    import json

    from tests.tiny_models import build

    folder = build("llama", tmp_path / "llama")
    text = (f"model: {folder}\noutput: {tmp_path / 'out'}\nsplit:\n  experts: 5\n  top_k: 2\n  shared: 1\n"
            "  pad_to: 16\n  dense_layers: [1]\n")
    with_headers = check_recipe(parse_recipe(text, "r.yaml"))
    config_only = check_model_config(parse_recipe(text, "r.yaml"), json.loads((folder / "config.json").read_text()))
    # 96 neurons over 5 + 1 experts is 16 each, already a multiple of 16; layer 0 is MoE, layer 1 stays dense
    assert with_headers.activation_ratio == config_only.activation_ratio == pytest.approx((3 * 16 + 96) / (2 * 96))
    for key in ("architecture", "expert_size", "activation_ratio"):
        assert with_headers.steps[0].estimate[key] == config_only.steps[0].estimate[key], key
    assert config_only.steps[0].estimate["architecture"] == "Qwen2MoeForCausalLM"


def test_activation_ratio_counts_dense_layers_in_full():
    from moeify.arch import TargetPlan
    from moeify.split.convert import activation_ratio

    assert activation_ratio(TargetPlan(8, 2, 0, 24, []), 4, 192) == pytest.approx(2 * 24 / 192)
    assert activation_ratio(TargetPlan(8, 2, 1, 24, [0]), 4, 192) == pytest.approx((3 * 3 * 24 + 192) / (4 * 192))


def test_unknown_shipped_name_suggests_close_ones():
    with pytest.raises(InputError) as e:
        find_recipe("qwen3-0.6b-8x2")
    assert "qwen3-0.6b-8x2-fp8" in e.value.hint


def test_recipes_are_package_data():
    """The recipes live in recipes/ and reach the package through the moeify/recipes link (wheel included)."""
    from moeify.pipeline.recipe import shipped_dir

    repo_recipes = Path(__file__).resolve().parent.parent / "recipes"
    assert sorted(p.name for p in shipped_dir().glob("*.yaml")) == sorted(p.name for p in repo_recipes.glob("*.yaml"))
