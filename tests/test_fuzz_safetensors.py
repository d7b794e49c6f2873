"""Property-based fuzzing of everything moeify parses from a stranger's checkpoint.

The property is the same everywhere: a generated file is either accepted, and then every tensor it
declares lies inside the file and reads back with the declared size, or it is refused with an InputError
(a one-line message the CLI shows as `error:`). Any other exception is a bug. The runs are small
(`max_examples` below) so the whole file takes seconds; `derandomize` keeps CI reproducible.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeify.errors import InputError, MoeifyError
from moeify.io.reader import CheckpointReader
from moeify.io.safetensors_format import read_header, read_tensor
from moeify.split.convert import SplitOptions, plan_split
from tests.hostile import join_file, split_file, tiny_config, write_checkpoint

EXAMPLES = 200
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
small_ints = st.one_of(st.integers(-3, 300), st.sampled_from([2**31, 2**32, 2**63 - 1, 2**64, -2**63]))
dtypes = st.one_of(st.sampled_from(["F32", "F16", "BF16", "F8_E4M3", "I64", "BOOL", "U8", "F64"]),
                   st.sampled_from(["F4", "f32", "", "C64", "U64", "F8_E8M0"]), json_values)


@st.composite
def entries(draw):
    """A tensor entry that is usually well-formed in its parts and often wrong in how they fit."""
    shape = draw(st.one_of(st.lists(small_ints, max_size=3), st.lists(st.integers(0, 8), max_size=3),
                           json_values))
    begin = draw(small_ints)
    end = draw(st.one_of(small_ints, st.integers(0, 64).map(lambda d: begin + d if isinstance(begin, int) else d)))
    offsets = draw(st.one_of(st.just([begin, end]), json_values))
    entry = {"dtype": draw(dtypes), "shape": shape, "data_offsets": offsets}
    if draw(st.booleans()):
        entry.pop(draw(st.sampled_from(list(entry))))
    return draw(st.one_of(st.just(entry), json_values)) if draw(st.integers(0, 9)) == 0 else entry


headers = st.dictionaries(st.text(max_size=10), entries(), max_size=4).flatmap(
    lambda h: st.one_of(st.just(h), st.builds(lambda m: {**h, "__metadata__": m}, json_values)))


def _assert_accepted_file_is_sound(path: Path) -> None:
    """Either refused with InputError, or every tensor lies in the file and reads back at its size."""
    try:
        tensors, metadata = read_header(path)
    except InputError:
        return
    size = path.stat().st_size
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    for info in tensors.values():
        assert 0 <= info.start and info.start + info.nbytes <= size
        assert info.nbytes == math.prod(info.shape) * info.dtype.itemsize
        assert read_tensor(info).shape == info.shape


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_never_crash_the_header_parser(work, raw):
    path = work / "random.safetensors"
    path.write_bytes(raw)
    _assert_accepted_file_is_sound(path)


@FUZZ
@given(header=headers, data=st.binary(max_size=96), length_delta=st.sampled_from([0, 0, 0, -1, 1, -8, 2**40]))
def test_generated_headers_are_accepted_only_when_consistent(work, header, data, length_delta):
    path = work / "generated.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data)
    _assert_accepted_file_is_sound(path)


@pytest.fixture(scope="module")
def valid_file(work) -> Path:
    return write_checkpoint(work / "valid", max_shard_bytes=1 << 40) / "model.safetensors"


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 320_000)))
def test_byte_flips_and_truncations_of_a_real_file(work, valid_file, flips, cut):
    raw = bytearray(valid_file.read_bytes())
    for pos, value in flips:  # the first 4 KB: the length field and the JSON header
        raw[pos % len(raw)] = value
    path = work / "flipped.safetensors"
    path.write_bytes(bytes(raw[:cut] if cut is not None else raw))
    _assert_accepted_file_is_sound(path)


@FUZZ
@given(edit=st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]), json_values, min_size=1),
       which=st.integers(0, 20))
def test_one_field_of_a_real_header_replaced(work, valid_file, edit, which):
    header, data = split_file(valid_file)
    names = [n for n in header if n != "__metadata__"]
    header[names[which % len(names)]].update(edit)
    path = work / "edited.safetensors"
    join_file(path, header, data)
    _assert_accepted_file_is_sound(path)


@pytest.fixture(scope="module")
def sharded_template(work) -> Path:
    return write_checkpoint(work / "sharded", max_shard_bytes=60_000)


@FUZZ
@given(weight_map=st.one_of(json_values, st.dictionaries(st.text(max_size=30), st.one_of(
    st.sampled_from(["model-00001-of-00006.safetensors", "model-00002-of-00006.safetensors", "../x", "/etc/hosts",
                     "a/../../b", "", ".", "sub/", "x\x00y", "C:\\w"]), json_values), max_size=6)),
    metadata=json_values)
def test_generated_indexes_are_refused_cleanly(work, sharded_template, weight_map, metadata):
    folder = work / "index-case"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(sharded_template, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": metadata,
                                                                      "weight_map": weight_map}))
    try:
        reader = CheckpointReader(folder)
    except InputError:
        return
    assert all(info.file.parent == folder for info in reader.tensors.values())


CONFIG_KEYS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "hidden_act", "mlp_bias", "attention_bias",
               "rope_parameters", "rope_scaling", "tie_word_embeddings", "sliding_window", "max_position_embeddings"]
config_values = st.one_of(json_values, small_ints, st.sampled_from(["llama", "mistral", "qwen2", "qwen3",
                                                                    "mixtral", "silu", 64, 96, 2, 4, 16, 128]))


@pytest.fixture(scope="module")
def config_model(work) -> Path:
    return write_checkpoint(work / "config-model")


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), st.one_of(st.just(None), config_values),
                               min_size=1, max_size=4),
       drop=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2))
def test_generated_configs_plan_or_fail_with_a_moeify_error(config_model, changes, drop):
    config = tiny_config(**changes)
    for key in drop:
        config.pop(key, None)
    (config_model / "config.json").write_text(json.dumps(config))
    try:
        plan = plan_split(config_model, SplitOptions(experts=4, top_k=2))
    except MoeifyError as e:
        assert e.exit_code == 2 and "\n" not in e.message
        return
    assert plan.target_config["hidden_size"] == 64 and plan.layers == 2


@FUZZ
@given(experts=small_ints, top_k=small_ints, shared=small_ints, pad_to=small_ints,
       target=st.sampled_from([None, "mixtral", "qwen2_moe", "qwen3_moe", "x"]),
       dense=st.lists(small_ints, max_size=3))
def test_generated_options_plan_or_fail_with_a_usage_error(config_model, experts, top_k, shared, pad_to, target,
                                                           dense):
    (config_model / "config.json").write_text(json.dumps(tiny_config()))
    options = SplitOptions(experts=experts, top_k=top_k, shared=shared, pad_to=pad_to, target=target,
                           dense_layers=dense)
    try:
        plan = plan_split(config_model, options)
    except MoeifyError as e:
        assert e.exit_code == 2 and "\n" not in e.message
        return
    assert 1 <= plan.target_plan.top_k <= plan.target_plan.experts
    assert plan.target_plan.expert_size >= 1


MOE_KEYS = ["model_type", "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "intermediate_size", "shared_expert_intermediate_size", "num_hidden_layers", "mlp_only_layers",
            "hidden_size", "quantization_config", "tie_word_embeddings", "architectures"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(MOE_KEYS), st.one_of(st.just(None), config_values),
                               min_size=1, max_size=5),
       moe_type=st.sampled_from(["mixtral", "qwen2_moe", "qwen3_moe", "llama"]))
def test_inspect_describes_or_refuses_any_config(config_model, changes, moe_type):
    from moeify.describe import describe

    config = tiny_config(model_type=moe_type, num_local_experts=4, num_experts_per_tok=2)
    config.update(changes)
    (config_model / "config.json").write_text(json.dumps(config))
    try:
        info = describe(config_model)
    except MoeifyError as e:
        assert e.exit_code == 2 and "\n" not in e.message
        return
    json.dumps(info, default=str)  # what --json prints


@pytest.fixture(scope="module")
def fp8_model(work, config_model) -> Path:
    from moeify.quant.quantize import quantize_fp8

    (config_model / "config.json").write_text(json.dumps(tiny_config()))
    out = work / "fp8"
    quantize_fp8(config_model, out, scheme="block", verify=False)
    return out


quant_configs = st.fixed_dictionaries({}, optional={
    "quant_method": st.one_of(st.sampled_from(["fp8", "compressed-tensors", "gptq"]), json_values),
    "fmt": st.one_of(st.just("e4m3"), json_values),
    "format": st.one_of(st.just("float-quantized"), json_values),
    "activation_scheme": st.one_of(st.just("dynamic"), json_values),
    "weight_block_size": st.one_of(st.lists(small_ints, max_size=3), json_values),
    "config_groups": json_values, "ignore": json_values, "modules_to_not_convert": json_values})


@settings(FUZZ, max_examples=100)
@given(qc=st.one_of(quant_configs, json_values))
def test_dequantize_reads_or_refuses_any_quantization_config(work, fp8_model, qc):
    from moeify.quant.dequantize import dequantize_checkpoint

    config = json.loads((fp8_model / "config.json").read_text())
    config["quantization_config"] = qc
    (fp8_model / "config.json").write_text(json.dumps(config))
    try:
        dequantize_checkpoint(fp8_model, work / "dequantized", overwrite=True)
    except MoeifyError as e:
        assert e.exit_code in (1, 2) and "\n" not in e.message


metadata_values = st.recursive(
    st.one_of(json_scalars, st.sampled_from(["split", "quantize", "finetune", "eval", "mixtral", "block"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["split", "quantize", "finetune", "eval", "source", "options", "experts", "top_k", "id", "kind",
         "activation_ratio", "scheme", "perplexity", "texts", "license", "revision", "metrics", "layers",
         "complete", "moeify_version", "architecture", "target"]), inner, max_size=5)), max_leaves=20)


@settings(FUZZ, max_examples=100)
@given(stages=st.one_of(metadata_values, st.dictionaries(st.sampled_from(["split", "quantize", "finetune", "eval"]),
                                                          metadata_values, max_size=4)),
       extra=st.dictionaries(st.sampled_from(["last_stage", "moeify_version", "recipe"]), metadata_values))
def test_push_plans_a_card_or_refuses_for_any_moeify_json(work, config_model, stages, extra):
    """moeify.json travels with checkpoints from others; inspect and the model card must never crash on it."""
    from moeify.describe import describe
    from moeify.publish.hub import plan_push

    (config_model / "config.json").write_text(json.dumps(tiny_config()))
    (config_model / "moeify.json").write_text(json.dumps({**extra, "stages": stages}))
    try:
        json.dumps(describe(config_model), default=str)
        try:
            plan = plan_push(config_model, "me/tiny")
        except MoeifyError as e:
            assert "\n" not in e.message
            return
        assert plan.card
    finally:
        (config_model / "moeify.json").unlink()
