"""The one check of config.json against the tensors, run by every stage that reads a checkpoint.

split, quantize, dequantize, finetune, eval and push all call `check_checkpoint` before they write or
load anything. config.json is what every loader trusts: a layer count, size or layout key that lies gives
a model that fails to load, or, worse, loads with layers dropped or weights randomly initialised. The
check reads safetensors headers only (milliseconds), and the first contradiction is one InputError naming
the config key, the value it claims, what the tensors hold and the fix. In order:

1. values: every size and count the family or target reads is an integer in range (positive; 0 only
   where it means "none"), no larger than the tensors could hold; layout keys have the right type;
2. layers: the layer indices in the tensors are exactly 0 .. num_hidden_layers - 1;
3. shapes: the FFN (dense family), the router, experts, shared expert and dense layers (MoE target) as the
   family and target objects name and size them, plus attention and embeddings (`shapes.py`);
4. tensor sets: every layer holds what its family or target declares: experts 0 .. E-1 (every expert
   count key present must agree), dense MLPs exactly in the layers `mlp_only_layers` and
   `decoder_sparse_step` make dense; every layer the same attention and norm tensors as the others;
   embeddings, final norm, and lm_head unless `tie_word_embeddings`.

FP8 checkpoints pass: their weights keep their shapes, and scale tensors (`weight_scale`,
`weight_scale_inv`, `input_scale`) are companions the config does not size; a layer must just hold the
same ones as the others. Model types moeify does not know get only the name rules of `shapes.py`: their
layouts may legitimately differ (DeepSeek-V3 stores its multi-token-prediction layer past
num_hidden_layers).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeify.arch import MOE_MODEL_TYPES, SOURCES
from moeify.arch.base import SourceFamily, TargetArch
from moeify.arch.shapes import EMBED, FINAL_NORM, LM_HEAD, Dims, check_shapes
from moeify.errors import InputError
from moeify.io.reader import CheckpointReader, load_json

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_KEEP = "or use the config.json saved with these weights"
_INCOMPLETE = "the checkpoint is incomplete: re-download it, or re-run the stage that wrote it"
# The expert count's two spellings: transformers 5's Mixtral and Qwen3-MoE configs read num_local_experts
# (num_experts an alias of it), Qwen2-MoE's num_experts; moeify writes both. Each one present must agree.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")
# The routed-expert width's key where it is not moe_intermediate_size (MixtralConfig has intermediate_size).
_WIDTH_KEYS = {"mixtral": "intermediate_size"}
_SENTINEL = 987_654_321  # an expert index no checkpoint has: cuts an expert's name into prefix and part


def check_checkpoint(reader: CheckpointReader, config: dict[str, Any]) -> None:
    """Refuse a checkpoint whose config.json contradicts its tensors (headers only); see the module text."""
    arch = architecture(config)
    if arch is None:
        check_shapes(reader, config)
        return
    held = _Held.read(reader, arch)
    _check_values(held, config, arch)
    layers = _check_layers(held, config)
    check_shapes(reader, config, _ffn_dims(held, config, arch, layers))
    if isinstance(arch, SourceFamily):
        declared = {i: list(arch.ffn_tensors(i)) for i in range(layers)}
    else:
        declared = _moe_layout(held, config, arch, layers)
    _check_ffn_tensors(held, config, declared)
    _check_same_tensors_per_layer(held, config, layers)
    _check_globals(held, config)


def check_folder(folder: Path) -> dict[str, Any]:
    """`check_checkpoint` on a checkpoint folder; returns its config.json (for stages that start from a path)."""
    config = load_json(Path(folder) / "config.json", "config.json")
    check_checkpoint(CheckpointReader(folder), config)
    return config


def architecture(config: dict[str, Any]) -> SourceFamily | TargetArch | None:
    """The dense family or MoE target config.json's model_type names, or None for one moeify does not know."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    family = next((f for f in SOURCES if model_type in f.model_types), None)
    return family if family is not None else MOE_MODEL_TYPES.get(model_type)


def width_key(target: TargetArch) -> str:
    """The config key transformers reads for the target's routed-expert width."""
    return _WIDTH_KEYS.get(target.name, "moe_intermediate_size")


def expert_count_key(config: dict[str, Any]) -> str | None:
    """The first spelling of the expert count config.json gives (after `_check_values`, all agree)."""
    return next((k for k in EXPERT_COUNT_KEYS if config.get(k) is not None), None)


@dataclass
class _Held:
    """What the headers say, gathered once: tensors by layer, FFN module prefixes, the largest dimension."""

    reader: CheckpointReader
    arch: SourceFamily | TargetArch
    by_layer: dict[int, list[str]] = field(default_factory=dict)
    max_dim: int = 1

    @classmethod
    def read(cls, reader: CheckpointReader, arch: SourceFamily | TargetArch) -> _Held:
        held = cls(reader, arch)
        for name, info in reader.tensors.items():
            held.max_dim = max(held.max_dim, *info.shape, 1)
            if m := _LAYER.match(name):
                held.by_layer.setdefault(int(m.group(1)), []).append(name)
        return held

    @property
    def folder(self):
        return self.reader.folder

    @property
    def layers(self) -> list[int]:
        return sorted(self.by_layer)

    def ffn_modules(self, layer: int) -> tuple[str, ...]:
        """The module prefixes (`model.layers.3.mlp.`) under which layer `layer` keeps its FFN or MoE block."""
        a = self.arch
        if isinstance(a, SourceFamily):
            names: tuple[str, ...] = a.ffn_tensors(layer)
        else:
            names = (a.router_name(layer), a.dense_names(layer).gate)
        modules = [n.rsplit(".", 2)[0] + "." for n in names]
        if not isinstance(a, SourceFamily):
            modules.append(self.expert_prefix(layer))
        return tuple(dict.fromkeys(modules))

    def expert_prefix(self, layer: int) -> str:
        """What every routed-expert tensor name of layer `layer` starts with, up to the expert index."""
        gate = self.arch.expert_names(layer, _SENTINEL).gate  # type: ignore[union-attr]
        return gate[: gate.index(str(_SENTINEL))]

    def experts(self, layer: int) -> set[int]:
        """The routed-expert indices layer `layer` holds tensors for (weights and FP8 scales alike)."""
        prefix = self.expert_prefix(layer)
        found = set()
        for name in self.by_layer.get(layer, []):
            if name.startswith(prefix) and (index := name[len(prefix):].split(".", 1)[0]).isdigit():
                found.add(int(index))
        return found

    def shape(self, name: str) -> list[int] | None:
        return list(self.reader.tensors[name].shape) if name in self.reader else None


# --- 1. values ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    key: str
    required: bool = True
    minimum: int = 1
    bound: str = "dim"  # "dim": no tensor dimension is smaller; "tensors": at most one per tensor; "" none


def _rules(config: dict[str, Any], arch: SourceFamily | TargetArch) -> list[_Rule]:
    rules = [_Rule("num_hidden_layers", bound=""), _Rule("hidden_size"), _Rule("vocab_size"),
             _Rule("num_attention_heads"), _Rule("num_key_value_heads", required=False),
             _Rule("head_dim", required=config.get("head_dim") is None and not _derives_head_dim(config["model_type"]))]
    if isinstance(arch, SourceFamily):
        return [*rules, _Rule("intermediate_size")]
    rules += [_Rule(k, required=False, bound="tensors") for k in EXPERT_COUNT_KEYS]  # one is (below)
    # Required: transformers' default top-k (8 for Qwen3-MoE) may be more than the experts there are.
    rules += [_Rule(width_key(arch)), _Rule("num_experts_per_tok", bound="")]
    if width_key(arch) != "intermediate_size":
        rules.append(_Rule("intermediate_size", required=False))  # required only by dense layers (step 3)
    if arch.shared_names(0) is not None:
        rules.append(_Rule("shared_expert_intermediate_size", minimum=0))
    if arch.supports_dense_layers:
        rules.append(_Rule("decoder_sparse_step", required=False, bound="tensors"))
    return rules


def _check_values(held: _Held, config: dict[str, Any], arch: SourceFamily | TargetArch) -> None:
    """Every size and count an integer in range, before anything is computed from it."""
    rules = _rules(config, arch)
    for key in [r.key for r in rules] + ["tie_word_embeddings", "mlp_only_layers"]:
        if key in config and config[key] is None and not _accepts_null(config["model_type"], key):
            what, n = _witness(held, config, key)
            raise InputError(f"{held.folder}: config.json {key} = null, which transformers refuses for "
                             f"{config['model_type']}; the tensors hold {what}",
                             (f"set {key} to {n}" if n is not None else f"give {key} a value, or remove it,")
                             + f" in config.json, {_KEEP}")
    for rule in rules:
        value = config.get(rule.key)
        if value is None:
            if rule.required:
                what, n = _witness(held, config, rule.key)
                raise InputError(f"{held.folder}: config.json has no {rule.key}; the tensors hold {what}",
                                 (f"add \"{rule.key}\": {n}" if n is not None else f"add {rule.key}")
                                 + f" to config.json, {_KEEP}")
            continue
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= rule.minimum
        limit = {"dim": held.max_dim, "tensors": len(held.reader.tensors)}.get(rule.bound)
        if ok and (limit is None or value <= limit):
            continue
        what, n = _witness(held, config, rule.key)
        claim = (f"is not an integer >= {rule.minimum}" if not ok else
                 f"is more than the tensors could hold (their largest dimension is {held.max_dim})"
                 if rule.bound == "dim" else f"is more than the tensors could hold ({len(held.reader.tensors)} "
                                             "tensors)")
        raise InputError(f"{held.folder}: config.json {rule.key} = {value!r} {claim}; the tensors hold {what}",
                         _fix(rule.key, n))
    if not isinstance(arch, SourceFamily):
        given = {k: config[k] for k in EXPERT_COUNT_KEYS if config.get(k) is not None}
        # Qwen2MoeConfig reads num_experts only (transformers is asked only when one spelling is missing)
        read = set(EXPERT_COUNT_KEYS) if len(given) == 2 else _fields(config["model_type"], EXPERT_COUNT_KEYS)
        if not given.keys() & read:
            what, n = _witness(held, config, "num_experts")
            key = " or ".join(k for k in EXPERT_COUNT_KEYS if k in read)
            raise InputError(f"{held.folder}: config.json has no {key}, the expert count transformers reads for "
                             f"{config['model_type']}; the tensors hold {what}",
                             f"add \"{key.split()[0]}\": {n} to config.json, {_KEEP}" if n
                             else f"add {key} to config.json, {_KEEP}")
        if len(set(given.values())) > 1:
            what, n = _witness(held, config, "num_experts")
            raise InputError(f"{held.folder}: config.json {' and '.join(f'{k} = {v}' for k, v in given.items())} "
                             f"disagree; the tensors hold {what}",
                             f"set both to {n} in config.json, {_KEEP}" if n else f"correct them, {_KEEP}")
        count = next(iter(given.values()))
        top_k = config.get("num_experts_per_tok")
        if top_k is not None and top_k > count:
            raise InputError(f"{held.folder}: config.json num_experts_per_tok = {top_k} is more than the "
                             f"{count} experts per layer the tensors hold",
                             f"set num_experts_per_tok to at most {count} in config.json, {_KEEP}")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads")
    if kv is not None and heads % kv:
        what, _ = _witness(held, config, "num_key_value_heads")
        raise InputError(f"{held.folder}: config.json num_key_value_heads = {kv} does not divide "
                         f"num_attention_heads = {heads}; the tensors hold {what}",
                         f"correct num_key_value_heads in config.json, {_KEEP}")
    tie = config.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise InputError(f"{held.folder}: config.json tie_word_embeddings = {tie!r} is not true or false; the "
                         f"tensors hold {'an' if LM_HEAD in held.reader else 'no'} {LM_HEAD}",
                         f"set tie_word_embeddings to {'false' if LM_HEAD in held.reader else 'true'} in "
                         f"config.json, {_KEEP}")


@functools.lru_cache(maxsize=64)
def _accepts_null(model_type: str, key: str) -> bool:
    """Whether transformers takes an explicit null for `key` of `model_type`: its config class turns it into
    a value (LlamaConfig's num_key_value_heads), or keeps a null head_dim that the attention then derives
    (MixtralConfig, whose save_pretrained writes `"head_dim": null`); not when the class refuses it
    (Qwen3Config's head_dim) or keeps a null count for the model to trip over (Qwen3MoeConfig's
    num_local_experts)."""
    from transformers import AutoConfig

    try:
        value = getattr(AutoConfig.for_model(model_type, **{key: None}), key, None)
    except Exception:  # noqa: BLE001 - whatever the class raises, it does not take the null
        return False
    return value is not None or key == "head_dim"


# transformers' answer to `_derives_head_dim` for the model types moeify reads and writes, so that planning
# a split does not import transformers' config machinery (2.6 s of a 2-layer split, profiled). The table
# is a cache, not a second source: tests/test_config_consistency.py asks transformers for every entry, so a
# release that changes one fails CI instead of a user's split.
HEAD_DIM_DERIVED = {"llama": True, "mistral": True, "qwen2": True, "qwen3": False, "phi3": True,
                    "mixtral": True, "qwen2_moe": True, "qwen3_moe": True}


def _derives_head_dim(model_type: str) -> bool:
    known = HEAD_DIM_DERIVED.get(model_type)
    return known if known is not None else transformers_derives_head_dim(model_type)


@functools.lru_cache(maxsize=16)
def transformers_derives_head_dim(model_type: str) -> bool:
    """Whether transformers derives an absent head_dim as hidden_size / heads (Llama) or has a fixed default
    (Qwen3Config: 128), which then must not be left to chance."""
    from transformers import AutoConfig

    head_dim = getattr(AutoConfig.for_model(model_type, hidden_size=96, num_attention_heads=3), "head_dim", None)
    return head_dim in (None, 32)  # None: the model derives it (MixtralAttention)


@functools.lru_cache(maxsize=16)
def _fields(model_type: str, keys: tuple[str, ...]) -> frozenset[str]:
    """Which of `keys` transformers' config class for `model_type` has (as fields or aliases)."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    return frozenset(k for k in keys if hasattr(default, k))


def _fix(key: str, n: int | None) -> str:
    return f"set {key} to {n} in config.json, {_KEEP}" if n is not None else f"correct {key} in config.json, {_KEEP}"


def _witness(held: _Held, config: dict[str, Any], key: str) -> tuple[str, int | None]:
    """What the tensors say about `key`: a short description, and the value they imply when one is clear."""
    arch, layers = held.arch, held.layers
    if key == "num_hidden_layers":
        if not layers:
            return "no model.layers.N tensors", None
        clean = layers == list(range(len(layers)))
        return f"{len(layers)} layers (model.layers.{layers[0]} to model.layers.{layers[-1]})", \
            len(layers) if clean else None
    if key in ("hidden_size", "vocab_size") and (shape := held.shape(EMBED)) and len(shape) == 2:
        return f"{EMBED} {shape}", shape[1] if key == "hidden_size" else shape[0]
    first = layers[0] if layers else 0
    down = None
    if isinstance(arch, SourceFamily):
        if key == "intermediate_size":
            down = arch.ffn_tensors(first)[-1]
    else:
        sparse = [i for i in layers if held.experts(i)]
        dense = [i for i in layers if arch.dense_names(i).down in held.reader]
        if key == width_key(arch) and sparse:
            down = arch.expert_names(sparse[0], 0).down
        elif key == "intermediate_size" and dense:
            down = arch.dense_names(dense[0]).down
        elif key == "shared_expert_intermediate_size" and sparse and (shared := arch.shared_names(sparse[0])):
            down = shared.down
        elif key in EXPERT_COUNT_KEYS + ("num_experts_per_tok",):
            if not sparse:
                return "no experts", None
            count = len(held.experts(sparse[0]))
            return f"{count} experts in layer {sparse[0]}", count if key != "num_experts_per_tok" else None
        elif key in ("decoder_sparse_step", "mlp_only_layers"):
            return f"experts in layers {sparse} and dense MLPs in layers {dense}", None
    if down is not None and (shape := held.shape(down)) and len(shape) == 2:
        return f"{down} {shape}", shape[1]
    attention = next((n for n in held.by_layer.get(first, []) if ".self_attn." in n and n.endswith("proj.weight")),
                     None)
    if key in ("num_attention_heads", "num_key_value_heads", "head_dim") and attention is not None:
        return f"{attention} {held.shape(attention)}", None
    return f"tensors whose largest dimension is {held.max_dim}", None


# --- 2. layers ------------------------------------------------------------------------------------------------


def _check_layers(held: _Held, config: dict[str, Any]) -> int:
    """The layer indices in the tensors are exactly 0 .. num_hidden_layers - 1; returns that count."""
    layers, found = config["num_hidden_layers"], held.layers
    if len(found) == layers and found == list(range(layers)):
        return layers
    what, n = _witness(held, config, "num_hidden_layers")
    if n is not None or not found:
        hint = _fix("num_hidden_layers", n) if n is not None else "is this a model folder of that family?"
        raise InputError(f"{held.folder}: config.json num_hidden_layers = {layers}, but the tensors hold {what}",
                         hint)
    gap = min(set(range(found[-1] + 1)) - set(found))
    raise InputError(f"{held.folder}: config.json num_hidden_layers = {layers}, but the tensors hold {what} with "
                     f"no tensors for layer {gap}", _INCOMPLETE)


# --- 3. shapes of what the family or target declares ----------------------------------------------------------


def _ffn_dims(held: _Held, config: dict[str, Any], arch: SourceFamily | TargetArch, layers: int) -> dict[str, Dims]:
    """Every FFN, expert and router tensor the family or target names, with its shape and the keys behind it."""
    if isinstance(arch, SourceFamily):
        return {name: dims for i in range(layers)
                for name, dims in _attribute(lambda c, i=i: arch.ffn_shapes(i, c), config).items()}
    count_key, wkey = expert_count_key(config), width_key(arch)
    h = (config["hidden_size"], ("hidden_size",))
    experts, width = (config[count_key], (count_key,)), (config[wkey], (wkey,))
    dims: dict[str, Dims] = {}

    def ffn(names, size) -> None:
        dims.update({names.gate: (size, h), names.up: (size, h), names.down: (h, size)})

    for i in range(layers):
        dims[arch.router_name(i)] = (experts, h)
        for j in held.experts(i):
            ffn(arch.expert_names(i, j), width)
        shared = arch.shared_names(i)
        if shared is not None:
            ffn(shared, (config["shared_expert_intermediate_size"], ("shared_expert_intermediate_size",)))
            dims[arch.shared_gate_name(i)] = ((1, ()), h)  # type: ignore[index]
        dense = arch.dense_names(i)
        if arch.supports_dense_layers and dense.gate in held.reader:
            if config.get("intermediate_size") is None:
                raise InputError(f"{held.folder}: config.json has no intermediate_size, which sizes layer {i}'s "
                                 f"dense MLP ({dense.down} {held.shape(dense.down)})",
                                 _fix("intermediate_size", (held.shape(dense.down) or [0, None])[1]))
            ffn(dense, (config["intermediate_size"], ("intermediate_size",)))
    return dims


_PROBED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


def _attribute(shapes, config: dict[str, Any]) -> dict[str, Dims]:
    """A family's `ffn_shapes` with the config keys behind each dimension, found by changing one key at a time."""
    base = shapes(config)
    probes = {k: shapes({**config, k: config[k] + 1}) for k in _PROBED if isinstance(config.get(k), int)}
    return {name: tuple((size, tuple(k for k, p in probes.items() if p[name][d] != size))
                        for d, size in enumerate(shape)) for name, shape in base.items()}


# --- 4. tensor sets --------------------------------------------------------------------------------------------


def _missing(held: _Held, config: dict[str, Any], name: str) -> InputError:
    return InputError(f"{held.folder}: config.json model_type = {config.get('model_type')!r} declares {name}, "
                      "which the tensors lack", f"{_INCOMPLETE}, or config.json belongs to another model")


def _dense_layers(config: dict[str, Any], target: TargetArch, layers: int, held: _Held) -> set[int]:
    """The layers config.json keeps dense, as transformers decides it (after checking the keys' types)."""
    if not target.supports_dense_layers:
        return set()
    only = config.get("mlp_only_layers")
    only = [] if only is None else only
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers
                                             for i in only):
        what, _ = _witness(held, config, "mlp_only_layers")
        raise InputError(f"{held.folder}: config.json mlp_only_layers = {only!r} is not a list of layer indices "
                         f"below num_hidden_layers = {layers}; the tensors hold {what}",
                         f"correct mlp_only_layers in config.json, {_KEEP}")
    step = config.get("decoder_sparse_step") or 1
    return {i for i in range(layers) if i in only or (i + 1) % step}


def _moe_layout(held: _Held, config: dict[str, Any], target: TargetArch, layers: int) -> dict[int, list[str]]:
    """Each layer's FFN tensors as the config lays them out, after checking the layout keys and expert counts
    against what each layer holds: experts where the layer is sparse, a dense MLP where it is kept dense."""
    declared = _dense_layers(config, target, layers, held)
    holds_dense = [i for i in range(layers) if any(n in held.reader for n in vars(target.dense_names(i)).values())]
    holds_sparse = [i for i in range(layers) if target.router_name(i) in held.reader or held.experts(i)]
    for i in range(layers):
        sparse, dense = i in holds_sparse, i in holds_dense
        if (i in declared and not sparse) or (i not in declared and not dense):
            continue
        _layout_error(held, config, target, i, declared, holds_sparse)
    counts = {k: config[k] for k in EXPERT_COUNT_KEYS if config.get(k) is not None}
    for i in holds_sparse:
        found = held.experts(i)
        for key, count in counts.items():
            if found != set(range(count)):
                contiguous = found == set(range(len(found)))
                span = f"experts 0 to {len(found) - 1}" if contiguous and found else f"experts {sorted(found)}"
                raise InputError(f"{held.folder}: config.json {key} = {count}, but layer {i} holds {len(found)} "
                                 f"{span}", _fix(key, len(found)) if contiguous else _INCOMPLETE)
    experts = next(iter(counts.values()))
    names: dict[int, list[str]] = {}
    for i in range(layers):
        if i in declared:
            names[i] = list(vars(target.dense_names(i)).values())
            continue
        names[i] = [target.router_name(i)]
        names[i] += [n for j in range(experts) for n in vars(target.expert_names(i, j)).values()]
        shared = target.shared_names(i)
        if shared is not None:
            names[i] += [*vars(shared).values(), target.shared_gate_name(i)]  # type: ignore[list-item]
    return names


def _check_ffn_tensors(held: _Held, config: dict[str, Any], declared: dict[int, list[str]]) -> None:
    """Every FFN tensor the layout declares is there, and the FFN modules hold nothing it has no place for
    (a Qwen2-MoE shared expert under a qwen3_moe config would be dropped by the loader without a word).
    A declared weight's companions (bias, FP8 scales) share its module and pass."""
    for i, names in declared.items():
        for name in names:
            if name not in held.reader:
                raise _missing(held, config, name)
        modules = {n.rsplit(".", 1)[0] for n in names}
        ffn = held.ffn_modules(i)
        stray = next((n for n in held.by_layer.get(i, []) if n.startswith(ffn) and n.rsplit(".", 1)[0] not in modules),
                     None)
        if stray is not None:
            raise InputError(f"{held.folder}: layer {i} holds {stray}, for which config.json (model_type = "
                             f"{config.get('model_type')!r}) has no place", "the loader would drop it: use the "
                             "config.json saved with these weights")


def _layout_error(held: _Held, config: dict[str, Any], target: TargetArch, layer: int, declared: set[int],
                  holds_sparse: list[int]) -> None:
    """Layer `layer` holds experts where the config has a dense MLP, or the other way round: name the key."""
    if layer in declared:
        example = next((n for n in held.by_layer[layer] if n.startswith(held.expert_prefix(layer))),
                       target.router_name(layer))
        holds = f"experts ({example})"
    else:
        example = next(n for n in vars(target.dense_names(layer)).values() if n in held.reader)
        holds = f"a dense MLP ({example})"
    dense_fix = [i for i in range(config["num_hidden_layers"]) if i not in holds_sparse]
    if not target.supports_dense_layers:
        raise InputError(f"{held.folder}: config.json model_type = {config.get('model_type')!r} has experts in "
                         f"every layer, but the tensors hold {holds} in layer {layer}",
                         f"{target.architecture} cannot keep layers dense; convert the dense model with a target "
                         f"that can (qwen2_moe, qwen3_moe), {_KEEP}")
    only = config.get("mlp_only_layers") or []
    step = config.get("decoder_sparse_step") or 1
    key, value = ("decoder_sparse_step", step) if layer not in only and (layer + 1) % step else \
        ("mlp_only_layers", only)
    kind = "dense" if layer in declared else "an MoE layer"
    hint = f"set mlp_only_layers to {dense_fix}" + (" and decoder_sparse_step to 1" if step != 1 else "")
    raise InputError(f"{held.folder}: config.json {key} = {value} makes layer {layer} {kind}, but the tensors "
                     f"hold {holds} there", f"{hint} in config.json, {_KEEP}")


def _check_same_tensors_per_layer(held: _Held, config: dict[str, Any], layers: int) -> None:
    """Attention, norms (and their FP8 scales): what one layer holds outside its FFN, every layer holds."""
    per_layer: dict[int, set[str]] = {}
    for i in range(layers):
        prefix, ffn = f"model.layers.{i}.", held.ffn_modules(i)
        per_layer[i] = {n[len(prefix):] for n in held.by_layer.get(i, []) if not n.startswith(ffn)}
    union = set().union(*per_layer.values())
    for i in range(layers):
        if lacking := sorted(union - per_layer[i]):
            other = next(j for j in range(layers) if lacking[0] in per_layer[j])
            raise InputError(f"{held.folder}: model.layers.{i}.{lacking[0]} is missing: config.json declares "
                             f"num_hidden_layers = {layers} {config.get('model_type')} layers and layer {other} "
                             "holds that tensor", _INCOMPLETE)


def _check_globals(held: _Held, config: dict[str, Any]) -> None:
    for name in (EMBED, FINAL_NORM):
        if name not in held.reader:
            raise _missing(held, config, name)
    if LM_HEAD not in held.reader and not config.get("tie_word_embeddings"):
        raise InputError(f"{held.folder}: config.json tie_word_embeddings = "
                         f"{str(config.get('tie_word_embeddings', False)).lower()}, but the tensors hold no "
                         f"{LM_HEAD}", "set tie_word_embeddings to true in config.json if the output head "
                                       f"shares the input embeddings; otherwise {_INCOMPLETE}")
