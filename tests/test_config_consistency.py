"""config.json against the tensors: every stage refuses a config that lies, or writes what transformers loads.

One tiny checkpoint per family (llama, mistral, qwen2, qwen3) and per MoE target written by `moeify split`
(mixtral; qwen2_moe with a shared expert and a dense layer; qwen3_moe with a dense layer), each also as
FP8. For every config key `moeify.arch.consistency` covers, hypothesis draws changed values (absurd ones:
missing, null, negative, zero, strings, floats, bools, lists, 10^30; plausible wrong ones: off by one,
doubled, halved, another layout or boolean) and every stage that reads such a checkpoint runs through the
CLI: split, quantize, eval and push --dry-run on dense inputs; quantize, finetune, eval and push on MoE
inputs; dequantize on the FP8 ones. Each run must either refuse cleanly (exit 2, one `error:` line that
names the key, no output folder) or succeed, and a success must leave a checkpoint that stock
transformers loads with no missing, unexpected or mismatched tensors and finite logits (for eval and
push, which write no checkpoint: the input they vouched for). The unmutated inputs pass every stage (the
control). Two values per key here; `test_many_mutations_per_key` (slow) draws twelve.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeify.arch.consistency import check_checkpoint
from moeify.errors import InputError
from moeify.io.reader import CheckpointReader
from tests.char_tokenizer import add_char_tokenizer
from tests.hostile import assert_clean_failure, cli, leftovers
from tests.tiny_models import build

DENSE = ("llama", "mistral", "qwen2", "qwen3")
# MoE input -> (dense source, split options)
MOE = {"mixtral": ("llama", []), "qwen2_moe": ("qwen2", ["--shared", "1", "--dense-layers", "0"]),
       "qwen3_moe": ("qwen3", ["--dense-layers", "1"])}
COMMON = ["num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
          "intermediate_size", "tie_word_embeddings"]
MOE_KEYS = ["num_local_experts", "num_experts", "num_experts_per_tok"]
QWEN_MOE_KEYS = ["moe_intermediate_size", "mlp_only_layers", "decoder_sparse_step"]
KEYS = {**{f: COMMON for f in DENSE}, "mixtral": COMMON + MOE_KEYS, "qwen3_moe": COMMON + MOE_KEYS + QWEN_MOE_KEYS,
        "qwen2_moe": COMMON + MOE_KEYS + QWEN_MOE_KEYS + ["shared_expert_intermediate_size"]}
CASES = [(family, key) for family, keys in KEYS.items() for key in keys]
DROP = "<drop>"  # the mutation that removes the key
TEXT = "Marianne would have thought herself very inexcusable.\n" * 30


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """family -> bf16 checkpoint, family + '_fp8' -> its FP8 quantization, 'text' -> a text file."""
    root = tmp_path_factory.mktemp("consistency")
    out: dict[str, Path] = {}
    for family in DENSE:
        out[family] = add_char_tokenizer(build(family, root / family))
    for target, (source, extra) in MOE.items():
        out[target] = root / target
        result = cli("split", out[source], "-o", out[target], "--experts", "4", "--top-k", "2", "--method",
                     "weights", "--target", target, *extra)
        assert result.exit_code == 0, result.stderr
    for name in list(out):
        out[f"{name}_fp8"] = root / f"{name}_fp8"
        assert cli("quantize", out[name], "--fp8", "-o", out[f"{name}_fp8"]).exit_code == 0
    out["text"] = root / "text.txt"
    out["text"].write_text(TEXT)
    return out


def _values(original):
    """Mutations of one config value: absurd ones, near misses, other layouts."""
    absurd = st.sampled_from([DROP, None, 0, -1, True, "2", 2.5, [], {}, 10**30])
    if isinstance(original, bool):
        return st.one_of(absurd, st.booleans())
    if isinstance(original, list):  # mlp_only_layers
        return st.one_of(absurd, st.just("0"), st.lists(st.integers(-1, 3), max_size=3))
    return st.one_of(absurd, st.sampled_from([original + 1, original - 1, 2 * original, original // 2]),
                     st.integers(1, 200))


def _stages(family: str, src: Path, fp8: Path, inputs: dict[str, Path], work: Path
            ) -> list[tuple[str, list, Path | None, Path]]:
    """(label, argv, output folder or None, the folder to load when the run succeeds) per stage."""
    text = inputs["text"]
    eval_args = ["--text", text, "--max-chunks", "1", "--seq-len", "32"]
    runs = [("quantize", ["quantize", src, "--fp8", "-o", work / "q", "--no-verify"], work / "q", work / "q"),
            ("eval", ["eval", src, *eval_args], None, src),
            ("push", ["push", src, "me/tiny", "--dry-run"], None, src),
            ("dequantize", ["dequantize", fp8, "-o", work / "d"], work / "d", work / "d")]
    if family in DENSE:
        runs.append(("split", ["split", src, "-o", work / "s", "--experts", "4", "--top-k", "2", "--method",
                               "weights"], work / "s", work / "s"))
    else:
        teacher = inputs[MOE[family][0]]  # unmutated
        runs.append(("finetune", ["finetune", src, "-o", work / "f", "--teacher", teacher, "--data", text,
                                  "--max-steps", "1", "--seq-len", "32", "--batch-size", "1", "--device", "cpu",
                                  "--stage", "2"], work / "f", work / "f"))
    return runs


def _mutate(folder: Path, key: str, value) -> None:
    config = json.loads((folder / "config.json").read_text())
    if value is DROP:
        config.pop(key, None)
    else:
        config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _assert_loads(folder: Path) -> None:
    """Stock transformers loads it with every tensor placed, and its logits are finite."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, local_files_only=True)
    bad = {k: v for k, v in info.items() if v}  # missing, unexpected or mismatched keys, error messages
    assert not bad, (folder, bad)
    with torch.no_grad():
        logits = model(torch.arange(1, 9).unsqueeze(0)).logits
    assert torch.isfinite(logits).all(), folder


def _run_every_stage(inputs: dict[str, Path], tmp_path: Path, family: str, key: str | None = None, value=None):
    """Mutate `key` of a copy of `family` (and of its FP8 copy), run every stage on it, judge each run."""
    work = tmp_path / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    src, fp8 = work / family, work / f"{family}_fp8"
    shutil.copytree(inputs[family], src)
    shutil.copytree(inputs[f"{family}_fp8"], fp8)
    if key is not None:
        _mutate(src, key, value)
        _mutate(fp8, key, value)
    loaded: set[Path] = set()
    for label, argv, output, loads in _stages(family, src, fp8, inputs, work):
        result = cli(*argv)
        if result.exit_code == 0:
            if loads not in loaded:  # eval and push vouch for the same input: load it once
                _assert_loads(loads)
                loaded.add(loads)
            continue
        assert key is not None, (label, result.stderr)  # the unmutated control must pass everywhere
        try:
            err = assert_clean_failure(result, output)
        except AssertionError as e:
            raise AssertionError(f"{label} with {key} = {value!r}: {e}") from None
        assert key in err, (label, value, err)  # the line names the key it blames


@pytest.mark.parametrize("family", list(KEYS))
def test_every_stage_accepts_the_unmutated_input_and_its_output_loads(inputs, tmp_path, family):
    """The control: a refusal below is the mutation's doing, and the success path is checked once per family."""
    check_checkpoint(CheckpointReader(inputs[family]), json.loads((inputs[family] / "config.json").read_text()))
    _run_every_stage(inputs, tmp_path, family)


def _draw(data, inputs: dict[str, Path], family: str, key: str):
    original = json.loads((inputs[family] / "config.json").read_text()).get(key)
    changed = _values(original if original is not None else 2).filter(
        lambda v: v != original or type(v) is not type(original))  # the unchanged value is the control's job
    return data.draw(changed, label=key)


_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize(("family", "key"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
@settings(max_examples=2, **_SETTINGS)
@given(data=st.data())
def test_a_mutated_config_is_refused_by_every_stage_or_still_loads(inputs, tmp_path, family, key, data):
    _run_every_stage(inputs, tmp_path, family, key, _draw(data, inputs, family, key))


@pytest.mark.slow
@pytest.mark.parametrize(("family", "key"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
@settings(max_examples=12, **_SETTINGS)
@given(data=st.data())
def test_many_mutations_per_key(inputs, tmp_path, family, key, data):
    """The same property with twelve values per key."""
    _run_every_stage(inputs, tmp_path, family, key, _draw(data, inputs, family, key))


def test_refusal_names_the_key_the_value_and_what_the_tensors_hold(inputs, tmp_path):
    """The message a user sees for the bug that started this: quantize given a config whose layers lie."""
    bad = Path(shutil.copytree(inputs["llama"], tmp_path / "bad"))
    _mutate(bad, "num_hidden_layers", 1)
    out = tmp_path / "out"
    err = assert_clean_failure(cli("quantize", bad, "--fp8", "-o", out), out)
    assert "num_hidden_layers = 1" in err and "2 layers" in err and "set num_hidden_layers to 2" in err
    _mutate(bad, "num_hidden_layers", 10**30)
    err = assert_clean_failure(cli("quantize", bad, "--fp8", "-o", out), out)
    assert f"num_hidden_layers = {10**30}" in err and "2 layers" in err


def test_layout_keys_follow_the_layers_that_hold_experts(inputs, tmp_path):
    """qwen2_moe fixture: layer 0 dense, layer 1 MoE. decoder_sparse_step 2 says the same (accepted);
    mlp_only_layers [1] says the opposite (refused, with the list the tensors imply)."""
    moe = Path(shutil.copytree(inputs["qwen2_moe"], tmp_path / "moe"))
    _mutate(moe, "mlp_only_layers", [])
    _mutate(moe, "decoder_sparse_step", 2)
    check_checkpoint(CheckpointReader(moe), json.loads((moe / "config.json").read_text()))
    _assert_loads(moe)
    _mutate(moe, "decoder_sparse_step", 1)
    _mutate(moe, "mlp_only_layers", [1])
    with pytest.raises(InputError) as e:
        check_checkpoint(CheckpointReader(moe), json.loads((moe / "config.json").read_text()))
    assert "mlp_only_layers = [1]" in e.value.message and "dense MLP" in e.value.message
    assert "set mlp_only_layers to [0]" in e.value.hint


def test_missing_and_stray_tensors_are_named(inputs, tmp_path):
    """A layer short of an expert or an attention tensor, or holding a tensor the layout has no place for."""
    from tests.hostile import write_checkpoint

    reader = CheckpointReader(inputs["qwen2_moe"])
    config = json.loads((inputs["qwen2_moe"] / "config.json").read_text())
    tensors = {n: reader.get(n) for n in reader.names()}
    cases = {"model.layers.1.mlp.experts.3.up_proj.weight": "declares model.layers.1.mlp.experts.3.up_proj",
             "model.layers.1.self_attn.q_proj.bias": "model.layers.1.self_attn.q_proj.bias is missing",
             "lm_head.weight": "tie_word_embeddings"}
    for i, (name, expected) in enumerate(cases.items()):
        config_i = dict(config, tie_word_embeddings=False) if name == "lm_head.weight" else config
        folder = write_checkpoint(tmp_path / f"m{i}", {n: t for n, t in tensors.items() if n != name}, config_i)
        with pytest.raises(InputError, match=expected):
            check_checkpoint(CheckpointReader(folder), config_i)
    stray = dict(tensors, **{"model.layers.1.mlp.experts.4.up_proj.weight": tensors[
        "model.layers.1.mlp.experts.3.up_proj.weight"]})
    folder = write_checkpoint(tmp_path / "stray", stray, config)
    with pytest.raises(InputError, match="num_local_experts = 4, but layer 1 holds"):
        check_checkpoint(CheckpointReader(folder), config)


def test_fp8_scales_are_accepted_and_unknown_model_types_get_the_shape_rules(inputs, tmp_path):
    for name in ("llama_fp8", "qwen2_moe_fp8", "mixtral_fp8"):
        reader = CheckpointReader(inputs[name])
        assert any(n.endswith(("weight_scale", "weight_scale_inv")) for n in reader.names())
        check_checkpoint(reader, json.loads((inputs[name] / "config.json").read_text()))
    other = Path(shutil.copytree(inputs["llama"], tmp_path / "other"))
    _mutate(other, "model_type", "some_new_model")
    _mutate(other, "num_hidden_layers", 7)  # an unknown layout may have layers elsewhere: not judged
    check_checkpoint(CheckpointReader(other), json.loads((other / "config.json").read_text()))
    _mutate(other, "hidden_size", 32)  # but a size the name rules cover still is
    with pytest.raises(InputError, match="hidden_size = 32"):
        check_checkpoint(CheckpointReader(other), json.loads((other / "config.json").read_text()))


def test_nothing_is_left_behind_by_a_refusal(inputs, tmp_path):
    bad = Path(shutil.copytree(inputs["mixtral"], tmp_path / "bad"))
    _mutate(bad, "num_local_experts", 8)
    _mutate(bad, "num_experts", 8)
    out = tmp_path / "out"
    assert_clean_failure(cli("quantize", bad, "--fp8", "-o", out), out, contains="num_local_experts = 8")
    assert leftovers(out) == []


def test_the_head_dim_table_is_what_transformers_does():
    """consistency.HEAD_DIM_DERIVED spares planning the transformers import; it must agree with transformers
    for every model type moeify reads or writes, and name them all."""
    from moeify.arch import MOE_MODEL_TYPES, SOURCES
    from moeify.arch.consistency import HEAD_DIM_DERIVED, transformers_derives_head_dim

    handled = {t for f in SOURCES for t in f.model_types} | set(MOE_MODEL_TYPES)
    assert set(HEAD_DIM_DERIVED) == handled
    assert {t: transformers_derives_head_dim(t) for t in handled} == HEAD_DIM_DERIVED
