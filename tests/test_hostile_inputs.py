"""Hostile and broken inputs through the real CLI: each is one `error:` line, exit 2, no traceback, no output.

Checkpoints come from strangers. Every case here damages a tiny, otherwise valid checkpoint in one way and
runs the commands that read it (split, quantize, inspect, dequantize) in-process through typer's runner with
exceptions not caught, so a traceback would fail the test rather than be swallowed.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.hostile import (
    assert_clean_failure,
    cli,
    edit_header,
    file_hashes,
    join_file,
    leftovers,
    split_file,
    tiny_config,
    tiny_tensors,
    write_checkpoint,
)

SINGLE = "model.safetensors"


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-templates")
    return {"single": write_checkpoint(root / "single"),
            "sharded": write_checkpoint(root / "sharded", max_shard_bytes=60_000)}


@pytest.fixture
def model(templates, tmp_path) -> Path:
    return Path(shutil.copytree(templates["single"], tmp_path / "model"))


@pytest.fixture
def sharded(templates, tmp_path) -> Path:
    return Path(shutil.copytree(templates["sharded"], tmp_path / "model"))


def _split(model: Path, out: Path, *extra: str):
    return cli("split", model, "-o", out, "--experts", "4", "--top-k", "2", *extra)


def _quantize(model: Path, out: Path, *extra: str):
    return cli("quantize", model, "--fp8", "-o", out, *extra)


# --- safetensors files ----------------------------------------------------------------------------


def _truncate(n: int) -> Callable[[Path], None]:
    def damage(f: Path) -> None:
        raw = f.read_bytes()
        f.write_bytes(raw[:n] if n >= 0 else raw[:n])
    return damage


def _header_bytes(raw: bytes) -> Callable[[Path], None]:
    def damage(f: Path) -> None:
        _, data = split_file(f)
        join_file(f, raw, data)
    return damage


def _length_field(value: int) -> Callable[[Path], None]:
    def damage(f: Path) -> None:
        raw = f.read_bytes()
        f.write_bytes(struct.pack("<Q", value) + raw[8:])
    return damage


def _entry(name: str, **changes) -> Callable[[Path], None]:
    def damage(f: Path) -> None:
        edit_header(f, lambda h: h[name].update(changes))
    return damage


def _header(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda f: edit_header(f, edit)


def _overlap(h: dict) -> None:
    a, b = h["model.norm.weight"]["data_offsets"], h["lm_head.weight"]["data_offsets"]
    h["lm_head.weight"]["data_offsets"] = [a[0], a[0] + b[1] - b[0]]


def _same_offsets(h: dict) -> None:  # two tensors of the same size sharing their bytes
    h["model.layers.1.input_layernorm.weight"]["data_offsets"] = h["model.norm.weight"]["data_offsets"]


LM = "lm_head.weight"
SAFETENSORS_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty file": (_truncate(0), "truncated"),
    "truncated to 5 bytes": (_truncate(5), "truncated"),
    "truncated inside the header": (_truncate(100), "header claims"),
    "truncated data section": (_truncate(-100), "data section"),
    "padded data section": (lambda f: f.write_bytes(f.read_bytes() + b"\0" * 64), "data section"),
    "header length larger than the file": (_length_field(10**6), "header claims"),
    "header length 2**63": (_length_field(2**63), "header claims"),
    "header not JSON": (_header_bytes(b"{this is not json"), "not valid JSON"),
    "header not UTF-8": (_header_bytes(b"\xff\xfe\x00{}"), "not valid JSON"),
    "header a JSON list": (_header_bytes(b"[1, 2]"), "not a JSON object"),
    "header JSON null": (_header_bytes(b"null"), "not a JSON object"),
    "__metadata__ not strings": (_header(lambda h: h.update(__metadata__={"a": 1})), "__metadata__"),
    "entry not an object": (_header(lambda h: h.update({LM: [1, 2]})), "lacks dtype"),
    "entry missing shape": (_header(lambda h: h[LM].pop("shape")), "lacks dtype"),
    "offsets past the end": (_entry(LM, data_offsets=[0, 10**12]), "outside"),
    "offsets reversed": (_entry(LM, data_offsets=[100, 0]), "outside"),
    "offsets negative": (_entry(LM, data_offsets=[-8, 32760]), "outside"),
    "offsets not integers": (_entry(LM, data_offsets=["0", "4"]), "invalid data_offsets"),
    "offsets three numbers": (_entry(LM, data_offsets=[0, 4, 8]), "invalid data_offsets"),
    "offsets overlapping": (_header(_overlap), "overlaps"),
    "two tensors sharing bytes": (_header(_same_offsets), "corrupt"),
    "unknown dtype": (_entry(LM, dtype="F4"), "unknown dtype"),
    "dtype a list": (_entry(LM, dtype=["F32"]), "unknown dtype"),
    "dtype a number": (_entry(LM, dtype=32), "unknown dtype"),
    "shape disagrees with byte count": (_entry(LM, shape=[128, 65]), "needs"),
    "shape with a negative dimension": (_entry(LM, shape=[-128, -64]), "invalid shape"),
    "shape with a float": (_entry(LM, shape=[128.0, 64]), "invalid shape"),
    "shape with a bool": (_entry(LM, shape=[True, 64]), "invalid shape"),
    "shape not a list": (_entry(LM, shape="128x64"), "invalid shape"),
    "shape overflowing int64": (_entry(LM, shape=[2**40, 2**40]), "needs"),
    "dtype changed (byte count off)": (_entry(LM, dtype="F16"), "needs"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_damaged_safetensors_file_is_refused_by_every_command(model, tmp_path, case):
    damage, expected = SAFETENSORS_CASES[case]
    damage(model / SINGLE)
    before = file_hashes(model)
    out = tmp_path / "out"
    for result in (_split(model, out), _quantize(model, out), cli("inspect", model),
                   cli("dequantize", model, "-o", out), cli("push", model, "me/tiny", "--dry-run")):
        err = assert_clean_failure(result, out, contains=expected)
        assert SINGLE in err  # the file is named
    assert file_hashes(model) == before


def _drop_shard(folder: Path) -> None:
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()


def _edit_index(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        edit(index)
        path.write_text(json.dumps(index))
    return damage


def _move_tensor(index: dict) -> None:
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]


def _first_shard(index: dict) -> str:
    return sorted(set(index["weight_map"].values()))[0]


def _rename_first(name: object) -> Callable[[dict], None]:
    def edit(index: dict) -> None:
        first = _first_shard(index)
        index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    return edit


def _duplicate_without_index(folder: Path) -> None:
    (folder / "model.safetensors.index.json").unlink()
    first = sorted(folder.glob("model-*.safetensors"))[0]
    shutil.copyfile(first, folder / "zz-copy.safetensors")


INDEX_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "index names a missing shard": (_drop_shard, "missing"),
    "index places a tensor in the wrong shard": (_edit_index(_move_tensor), "disagree"),
    "index lacks a tensor the shards have": (
        _edit_index(lambda i: i["weight_map"].pop(sorted(i["weight_map"])[0])), "not in the index"),
    "index names a tensor no shard has": (
        _edit_index(lambda i: i["weight_map"].update(ghost=_first_shard(i))), "no shard"),
    "index with an empty weight_map": (_edit_index(lambda i: i.update(weight_map={})), "weight_map"),
    "index weight_map a list": (_edit_index(lambda i: i.update(weight_map=[1])), "weight_map"),
    "index not JSON": (lambda f: (f / "model.safetensors.index.json").write_text("{oops"), "not valid JSON"),
    "index a JSON string": (lambda f: (f / "model.safetensors.index.json").write_text('"x"'), "JSON object"),
    "shard name with ../": (_edit_index(_rename_first("../model.safetensors")), "unsafe path"),
    "shard name absolute": (_edit_index(_rename_first("/etc/passwd")), "unsafe path"),
    "shard name with a backslash": (_edit_index(_rename_first("..\\model.safetensors")), "unsafe path"),
    "shard name with a NUL byte": (_edit_index(_rename_first("model\x00.safetensors")), "unsafe path"),
    "shard name not a string": (_edit_index(_rename_first(7)), "unsafe path"),
    "shard name empty": (_edit_index(_rename_first("")), "unsafe path"),
    "same tensor in two shards": (_duplicate_without_index, "also appears"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_inconsistent_index_and_shards_are_refused(sharded, tmp_path, case):
    damage, expected = INDEX_CASES[case]
    damage(sharded)
    out = tmp_path / "out"
    for result in (_split(sharded, out), _quantize(sharded, out), cli("inspect", sharded),
                   cli("push", sharded, "me/tiny", "--dry-run")):
        assert_clean_failure(result, out, contains=expected)


def test_symlinked_shards_inside_the_folder_are_followed(sharded, tmp_path):
    """The Hub cache stores shards as symlinks into ../../blobs: names are checked, link targets are not."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in sharded.glob("*.safetensors"):
        target = blobs / shard.name
        shard.rename(target)
        shard.symlink_to(Path("..") / "blobs" / shard.name)
    result = cli("inspect", sharded, "--json")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    assert _split(sharded, out).exit_code == 0


# --- config.json ----------------------------------------------------------------------------------


def _config(**changes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is _DROP:
                config.pop(key)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return damage


_DROP = object()
CONFIG_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "config.json missing": (lambda f: (f / "config.json").unlink(), "config.json"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{'hidden_size': 6"), "not valid JSON"),
    "config.json empty": (lambda f: (f / "config.json").write_text(""), "not valid JSON"),
    "config.json a list": (lambda f: (f / "config.json").write_text("[]"), "JSON object"),
    "config.json not UTF-8": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"), "config.json"),
    "config.json a folder": (lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()),
                             "config.json"),
    "no model_type": (_config(model_type=_DROP), "model_type"),
    "no hidden_size": (_config(hidden_size=_DROP), "hidden_size"),
    "no intermediate_size": (_config(intermediate_size=_DROP), "intermediate_size"),
    "no num_hidden_layers": (_config(num_hidden_layers=_DROP), "num_hidden_layers"),
    "hidden_size contradicts the tensors": (_config(hidden_size=32), "hidden_size"),
    "intermediate_size contradicts the tensors": (_config(intermediate_size=48), "intermediate_size"),
    "more layers than the tensors": (_config(num_hidden_layers=3), "num_hidden_layers"),
    "fewer layers than the tensors": (_config(num_hidden_layers=1), "num_hidden_layers"),
    "vocab_size contradicts the tensors": (_config(vocab_size=100), "vocab_size"),
    "num_attention_heads contradicts q_proj": (_config(num_attention_heads=3, head_dim=_DROP),
                                               "num_attention_heads"),
    "num_key_value_heads contradicts k_proj": (_config(num_key_value_heads=4), "num_key_value_heads"),
    "hidden_size zero": (_config(hidden_size=0), "hidden_size"),
    "hidden_size negative": (_config(hidden_size=-64), "hidden_size"),
    "intermediate_size zero": (_config(intermediate_size=0), "intermediate_size"),
    "millions of layers": (_config(num_hidden_layers=5_000_000), "num_hidden_layers"),
    "layers 10**30": (_config(num_hidden_layers=10**30), "num_hidden_layers"),
    "hidden_size a string": (_config(hidden_size="64"), "hidden_size"),
    "hidden_size a float": (_config(hidden_size=64.0), "hidden_size"),
    "hidden_size true": (_config(hidden_size=True), "hidden_size"),
    "num_attention_heads zero": (_config(num_attention_heads=0), "num_attention_heads"),
    "vocab_size negative": (_config(vocab_size=-1), "vocab_size"),
    "model_type a list": (_config(model_type=["llama"]), "model_type"),
    "model_type unknown": (_config(model_type="gpt2"), "not supported"),
    "model_type already MoE": (_config(model_type="mixtral"), "already"),
    "hidden_act gelu": (_config(hidden_act="gelu"), "hidden_act"),
    "hidden_act a dict": (_config(hidden_act={"a": 1}), "hidden_act"),
    "mlp_bias true": (_config(mlp_bias=True), "bias"),
    "rope_parameters a list": (_config(rope_parameters=[1, 2]), "rope_parameters"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_refused_by_split(model, tmp_path, case):
    damage, expected = CONFIG_CASES[case]
    damage(model)
    out = tmp_path / "out"
    assert_clean_failure(_split(model, out), out, contains=expected)


@pytest.mark.parametrize("case", ["config.json missing", "config.json not JSON", "config.json a list",
                                  "config.json not UTF-8", "config.json a folder"])
def test_unreadable_config_is_refused_by_quantize_and_inspect(model, tmp_path, case):
    CONFIG_CASES[case][0](model)
    out = tmp_path / "out"
    assert_clean_failure(_quantize(model, out), out, contains="config.json")
    assert_clean_failure(cli("inspect", model), contains="config.json")


# --- NaN and inf ----------------------------------------------------------------------------------

NONFINITE = {
    "NaN in an FFN weight": ("model.layers.1.mlp.down_proj.weight", math.nan),
    "inf in an attention weight": ("model.layers.0.self_attn.q_proj.weight", math.inf),
    "-inf in the embeddings": ("model.embed_tokens.weight", -math.inf),
    "NaN in a norm": ("model.norm.weight", math.nan),
}


@pytest.mark.parametrize("case", list(NONFINITE))
def test_nonfinite_weights_are_named_by_split_and_quantize(tmp_path, case):
    name, value = NONFINITE[case]
    tensors = tiny_tensors()
    tensors[name].view(-1)[7] = value
    model = write_checkpoint(tmp_path / "model", tensors)
    out = tmp_path / "out"
    assert_clean_failure(_split(model, out), out, contains=name)
    assert_clean_failure(_quantize(model, out), out, contains=name)


# --- pickles and remote code ----------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a marker file: proof that something ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _hostile_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))


def test_the_pickle_payload_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "control-marker"
    _hostile_pickle(tmp_path / "control.bin", marker)
    pickle.loads((tmp_path / "control.bin").read_bytes())  # the control: what a careless loader would do
    assert marker.exists()


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "consolidated.00.pth", "model.ckpt"])
def test_pickle_only_checkpoint_is_refused_and_never_unpickled(tmp_path, weights):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_config()))
    marker = tmp_path / "MARKER-unpickled"
    _hostile_pickle(model / weights, marker)
    out = tmp_path / "out"
    for result in (_split(model, out), _quantize(model, out), cli("inspect", model),
                   cli("dequantize", model, "-o", out)):
        assert_clean_failure(result, out, contains="pickle")
    assert not marker.exists()


def test_pickle_beside_safetensors_is_ignored(model, tmp_path):
    marker = tmp_path / "MARKER-unpickled"
    _hostile_pickle(model / "pytorch_model.bin", marker)
    _hostile_pickle(model / "training_args.bin", marker)
    assert _split(model, tmp_path / "moe").exit_code == 0
    assert _quantize(model, tmp_path / "fp8").exit_code == 0
    assert cli("inspect", model).exit_code == 0
    assert not marker.exists()
    assert not (tmp_path / "moe" / "pytorch_model.bin").exists()


def _with_remote_code(folder: Path, marker: Path, model_type: str = "llama") -> None:
    code = f"open({str(marker)!r}, 'w').close()\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(code)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
         "tokenizer_class": "Evil"}))


def test_auto_map_code_is_never_executed(model, tmp_path):
    marker = tmp_path / "MARKER-remote-code"
    _with_remote_code(model, marker)
    moe, fp8 = tmp_path / "moe", tmp_path / "fp8"
    # The data-driven default method needs the tokenizer, which here exists only as custom code: refused.
    assert_clean_failure(_split(model, moe), moe, contains="custom code")
    assert _split(model, moe, "--method", "weights").exit_code == 0
    assert "auto_map" not in json.loads((moe / "config.json").read_text())
    assert not list(moe.glob("*.py"))
    assert _quantize(moe, fp8).exit_code == 0
    assert cli("inspect", model).exit_code == 0
    assert cli("inspect", fp8).exit_code == 0
    assert not list(fp8.glob("*.py"))
    assert not marker.exists()


def test_custom_model_type_with_auto_map_is_refused_without_running_it(model, tmp_path):
    marker = tmp_path / "MARKER-remote-code"
    _with_remote_code(model, marker, model_type="evil")
    out = tmp_path / "out"
    assert_clean_failure(_split(model, out), out, contains="not supported")
    assert cli("inspect", model).exit_code == 0
    assert not marker.exists()


# --- FP8 checkpoints (dequantize) --------------------------------------------------------------------------


def _rewrite(folder: Path, mutate: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from moeify.io.reader import CheckpointReader

    reader = CheckpointReader(folder)
    tensors = {n: reader.get(n) for n in reader.names()}
    mutate(tensors)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    write_checkpoint(folder, tensors, json.loads((folder / "config.json").read_text()))


SCALE = "model.layers.0.self_attn.q_proj.weight_scale"
FP8_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    "NaN scale": (lambda t: t[SCALE].view(-1).__setitem__(0, math.nan), SCALE),
    "inf scale": (lambda t: t[SCALE].view(-1).__setitem__(3, math.inf), SCALE),
    "NaN code in an FP8 weight": (lambda t: t[SCALE[:-6]].view(torch.uint8).view(-1).__setitem__(5, 0x7F),
                                  SCALE[:-6]),
    "scale of the wrong shape": (lambda t: t.__setitem__(SCALE, torch.ones(3, 1)), "weight_scale"),
    "scale missing": (lambda t: t.pop(SCALE), "weight_scale"),
}


@pytest.mark.parametrize("case", list(FP8_CASES))
def test_damaged_fp8_checkpoint_is_refused_by_dequantize(templates, tmp_path, case):
    fp8 = tmp_path / "fp8"
    assert _quantize(templates["single"], fp8).exit_code == 0
    damage, expected = FP8_CASES[case]
    _rewrite(fp8, damage)
    out = tmp_path / "out"
    assert_clean_failure(cli("dequantize", fp8, "-o", out), out, contains=expected)


# --- GGUF files --------------------------------------------------------------------------------------------

GGUF_CASES: dict[str, bytes] = {
    "empty": b"",
    "not GGUF": b"PK\x03\x04" + bytes(range(256)) * 4,
    "magic only": b"GGUF",
    "absurd tensor count": b"GGUF" + struct.pack("<IQQ", 3, 2**40, 5) + bytes(300),
    "key length past the end": b"GGUF" + struct.pack("<IQQQ", 3, 1, 1, 2**50) + b"abc",
    "version 99": b"GGUF" + struct.pack("<IQQ", 99, 0, 0),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_damaged_gguf_is_refused(tmp_path, monkeypatch, case):
    pytest.importorskip("gguf")
    monkeypatch.setenv("MOEIFY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(GGUF_CASES[case])
    out = tmp_path / "out"
    assert_clean_failure(_split(path, out), out, contains="GGUF")
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


# --- options --------------------------------------------------------------------------------------

OPTION_CASES: dict[str, tuple[list[str], str]] = {
    "experts zero": (["--experts", "0"], "--experts"),
    "experts negative": (["--experts", "-3"], "--experts"),
    "experts more than neurons": (["--experts", "97"], "experts"),
    "experts a billion": (["--experts", "1000000000"], "experts"),
    "top-k zero": (["--experts", "4", "--top-k", "0"], "--top-k"),
    "top-k negative": (["--experts", "4", "--top-k", "-1"], "--top-k"),
    "top-k above experts": (["--experts", "4", "--top-k", "5"], "--top-k"),
    "shared negative": (["--shared", "-1"], "--shared"),
    "shared leaves no room": (["--experts", "4", "--shared", "93"], "experts"),
    "pad-to zero": (["--pad-to", "0"], "--pad-to"),
    "calibration tokens zero": (["--calibration-tokens", "0"], "--calibration-tokens"),
    "dense layer out of range": (["--target", "qwen2_moe", "--dense-layers", "2"], "--dense-layers"),
    "dense layers not numbers": (["--target", "qwen2_moe", "--dense-layers", "a,b"], "--dense-layers"),
    "unknown target": (["--target", "deepseek"], "target"),
    "unknown method": (["--method", "magic"], "--method"),
    "unknown dtype": (["--dtype", "int4"], "--dtype"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_split_options_are_usage_errors(model, tmp_path, case):
    args, expected = OPTION_CASES[case]
    out = tmp_path / "out"
    result = cli("split", model, "-o", out, *args)
    assert_clean_failure(result, out, contains=expected)


def _output_cases(model: Path, tmp_path: Path) -> dict[str, tuple[Path, list[str], str]]:
    return {
        "output is the input": (model, [], "is the input"),
        "output is the input, --overwrite": (model, ["--overwrite"], "is the input"),
        "output inside the input": (model / "moe", [], "inside the input"),
        "output deep inside the input": (model / "a" / "b", ["--overwrite"], "inside the input"),
        "output is the input via ..": (model / "x" / "..", [], "is the input"),
        "output contains the input, --overwrite": (tmp_path, ["--overwrite"], "contains the input"),
    }


@pytest.mark.parametrize("command", ["split", "quantize"])
def test_output_that_would_destroy_the_input_is_refused(model, tmp_path, command):
    before = file_hashes(model)
    for case, (out, extra, expected) in _output_cases(model, tmp_path).items():
        result = _split(model, out, *extra) if command == "split" else _quantize(model, out, *extra)
        assert_clean_failure(result, contains=expected)
        assert file_hashes(model) == before, case
    assert sorted(p.name for p in model.iterdir()) == sorted(before)


@pytest.mark.parametrize("command", ["split", "quantize"])
def test_existing_output_is_kept_without_overwrite(model, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _split(model, out) if command == "split" else _quantize(model, out)
    assert_clean_failure(result, contains="already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(out) == ["out"]


def test_output_under_a_regular_file_is_a_clean_error(model, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    assert_clean_failure(_split(model, out), code=1, contains="cannot create")
    assert (tmp_path / "file").read_text() == "x"


def test_missing_input_folder_and_hub_id_offline(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(_split(tmp_path / "nope", out), out, contains="no such folder")
    assert_clean_failure(_quantize(tmp_path / "nope", out), out)
    assert_clean_failure(cli("inspect", tmp_path / "nope"))


def test_checkpoint_that_is_already_fp8_is_refused_by_quantize(model, tmp_path):
    fp8, again = tmp_path / "fp8", tmp_path / "again"
    assert _quantize(model, fp8).exit_code == 0
    assert_clean_failure(_quantize(fp8, again), again, contains="already quantized")
    assert_clean_failure(_split(fp8, again), again)


def test_empty_tensor_dtype_bool_and_int_inputs_are_clean_errors(tmp_path):
    tensors = tiny_tensors()
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(96, 64, dtype=torch.int32)
    model = write_checkpoint(tmp_path / "model", tensors)
    out = tmp_path / "out"
    assert_clean_failure(_split(model, out), out)
    assert_clean_failure(_quantize(model, out), out)


# --- finetune and eval -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_pair(templates, tmp_path_factory) -> tuple[Path, Path, Path]:
    from tests.char_tokenizer import add_char_tokenizer

    root = tmp_path_factory.mktemp("moe-pair")
    dense = add_char_tokenizer(Path(shutil.copytree(templates["single"], root / "dense")))
    moe = root / "moe"
    assert _split(dense, moe, "--method", "weights").exit_code == 0
    text = root / "text.txt"
    text.write_text("Marianne would have thought herself very inexcusable.\n" * 30)
    return dense, moe, text


FINETUNE_CASES: dict[str, tuple[list[str], str]] = {
    "no budget": ([], "budget"),
    "max-steps and tokens": (["--max-steps", "2", "--tokens", "1k"], "both"),
    "tokens zero": (["--tokens", "0"], "--tokens"),
    "tokens garbage": (["--tokens", "lots"], "--tokens"),
    "seq-len zero": (["--max-steps", "2", "--seq-len", "0"], "--seq-len"),
    "batch-size negative": (["--max-steps", "2", "--batch-size", "-1"], "--batch-size"),
    "lr zero": (["--max-steps", "2", "--lr", "0"], "--lr"),
    "lr nan": (["--max-steps", "2", "--lr", "nan"], "--lr"),
    "lr inf": (["--max-steps", "2", "--lr", "inf"], "--lr"),
    "balance-coef inf": (["--max-steps", "2", "--balance-coef", "inf"], "--balance-coef"),
    "lr so large training diverges": (["--max-steps", "2", "--stage", "2", "--lr", "1e30"], "diverged"),
    "warmup negative": (["--max-steps", "2", "--warmup", "-5"], "--warmup"),
    "stage 3": (["--max-steps", "2", "--stage", "3"], "--stage"),
    "device tpu": (["--max-steps", "2", "--device", "tpu"], "--device"),
    "resume without checkpoint": (["--max-steps", "2", "--resume"], "checkpoint"),
    "missing data file": (["--max-steps", "2", "--data", "/nonexistent/text.txt"], "text"),
}


@pytest.mark.parametrize("case", list(FINETUNE_CASES))
def test_bad_finetune_options_are_usage_errors(moe_pair, tmp_path, case):
    dense, moe, text = moe_pair
    args, expected = FINETUNE_CASES[case]
    if "--data" not in args:
        args = [*args, "--data", str(text)]
    out = tmp_path / "out"
    result = cli("finetune", moe, "-o", out, "--teacher", dense, "--device", "cpu", *args) \
        if "--device" not in args else cli("finetune", moe, "-o", out, "--teacher", dense, *args)
    assert_clean_failure(result, out, contains=expected)


def test_finetune_refuses_dense_inputs_and_outputs_over_the_input(moe_pair, tmp_path):
    dense, moe, text = moe_pair
    base = ["--teacher", str(dense), "--data", str(text), "--max-steps", "1", "--device", "cpu"]
    out = tmp_path / "out"
    assert_clean_failure(cli("finetune", dense, "-o", out, *base), out, contains="not an MoE")
    assert_clean_failure(cli("finetune", moe, "-o", moe, *base), contains="is the input")
    assert_clean_failure(cli("finetune", moe, "-o", moe / "x", *base), contains="inside the input")
    other = write_checkpoint(tmp_path / "other", config=tiny_config(vocab_size=64),
                             tensors=tiny_tensors(tiny_config(vocab_size=64)))
    assert_clean_failure(cli("finetune", moe, "-o", out, *base[2:], "--teacher", other), out, contains="vocab")


def test_bad_eval_inputs_are_clean_errors(moe_pair, tmp_path):
    dense, moe, text = moe_pair
    assert_clean_failure(cli("eval", moe, "--text", tmp_path / "missing.txt"), contains="text")
    assert_clean_failure(cli("eval", moe, "--text", text, "--max-chunks", "0"), contains="--max-chunks")
    assert_clean_failure(cli("eval", moe, "--text", text, "--seq-len", "0"), contains="sequence length")
    assert_clean_failure(cli("eval", tmp_path / "nope", "--text", text))
    broken = Path(shutil.copytree(moe, tmp_path / "broken"))
    _truncate(-64)(broken / SINGLE)
    assert_clean_failure(cli("eval", broken, "--text", text, "--max-chunks", "1", "--seq-len", "32"))
