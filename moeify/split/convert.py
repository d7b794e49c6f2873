"""`moeify split`: a dense checkpoint becomes a stock MoE checkpoint, streamed one layer at a time.

The order is always: resolve the source, validate config and every shard header, build the complete
output plan (every tensor's name, dtype and shape, on paper) and check it, and only then read, split and
write one layer at a time straight into the planned shards. Memory holds one layer, never the model.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moeify import __version__
from moeify.arch import TargetArch, TargetPlan, source_family, target_arch
from moeify.arch.base import CARRIED_KEYS, IGNORED_KEYS
from moeify.arch.consistency import check_checkpoint
from moeify.device import CPU, Compute, check_device_name, resolve_device
from moeify.errors import InputError, UsageError
from moeify.io.checks import require_finite as check_finite
from moeify.io.output import atomic_output, check_output_path
from moeify.io.reader import CheckpointReader, load_json
from moeify.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, TensorSpec
from moeify.metadata import config_hash, write_metadata
from moeify.progress import SILENT, Reporter
from moeify.source import Source, copy_side_files, resolve_source
from moeify.split import dense_auto
from moeify.split.allocate import DEFAULT_ACTIVE, allocate
from moeify.split.methods import DEFAULT_METHOD, SplitContext, make_method
from moeify.split.methods.activations import STREAMS, ActivationsMethod
from moeify.split.moe_layer import FFNWeights, MoELayer

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SplitOptions:
    """Everything that decides the output of a split; recorded verbatim in moeify.json."""

    # None = chosen by moeify.split.allocate from `active` and the FFN width (the measured best layout).
    experts: int | None = None
    top_k: int | None = None
    shared: int | None = None
    active: float | None = None  # share of the FFN per token to aim for (default 0.5) when top_k is not given
    method: str = DEFAULT_METHOD
    target: str | None = None
    pad_to: int = 1
    # Layer indices kept dense, or "auto" / "auto:N": chosen by a screening pass (moeify.split.dense_auto).
    dense_layers: list[int] | str = field(default_factory=list)
    router_logit_std: float = 1e-5
    calibration: str | None = None
    # 4096 -> 16384 -> 32768 -> 53248 tokens: held-out geomean 2.47x -> 2.03x (no refinement) -> 1.97x -> 1.89x
    # -> 1.86x (100 refinement steps of step size 1e-3; 1.80x at 1e-2, 1.68x with the fair keep-if-better rule
    # and the repair after refinement) at 50%; 53248 (nearly all of the shipped text) splits SmolLM2 in about
    # 550 s on 2 idle cores, inside the 10-minute budget (docs/quality.md)
    calibration_tokens: int = 53248
    dtype: str = "auto"
    seed: int = 0
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    device: str = "auto"  # where calibration, clustering, router fit and repair run (moeify.device)
    # Settings of the activations method (docs/quality.md measures each); the weights method has none.
    stream: str = ActivationsMethod.stream
    router_ridge: float = ActivationsMethod.router_ridge
    down_ridge: float = ActivationsMethod.down_ridge
    reassign_rounds: int = ActivationsMethod.reassign_rounds
    refine_steps: int = ActivationsMethod.refine_steps
    refine_lr: float = ActivationsMethod.refine_lr
    refine_batch: int = ActivationsMethod.refine_batch


@dataclass
class SplitPlan:
    """The output on paper: checked completely before any weight is read."""

    source: Source
    config: dict[str, Any]
    target: TargetArch
    target_plan: TargetPlan
    target_config: dict[str, Any]
    specs: list[TensorSpec]
    intermediate: int
    layers: int
    dtype: torch.dtype
    dropped_config_keys: list[str]
    options: SplitOptions  # with the layout resolved (experts, top_k, shared never None)
    layout_why: str  # what the layout rules chose, for the user

    @property
    def padding(self) -> int:
        p = self.target_plan
        return (p.experts + p.shared) * p.expert_size - self.intermediate

    @property
    def activation_ratio(self) -> float:
        return activation_ratio(self.target_plan, self.layers, self.intermediate)


def activation_ratio(target_plan: TargetPlan, layers: int, intermediate: int) -> float:
    """Active FFN neurons per token / dense FFN neurons (dense layers count in full).

    A free function so `moeify validate` can give the figure from config.json alone, with no SplitPlan.
    """
    p = target_plan
    moe_layers = layers - len(p.dense_layers)
    active = moe_layers * (p.top_k + p.shared) * p.expert_size + len(p.dense_layers) * intermediate
    return active / (layers * intermediate)


def method_settings(options: SplitOptions) -> dict[str, Any]:
    """The options a method reads itself (its tuning), by name."""
    return {name: getattr(options, name) for name in ActivationsMethod.settings}


def resolve_layout(options: SplitOptions, intermediate: int) -> tuple[SplitOptions, str]:
    """The options with experts, top-k and shared filled in, and one line saying what was chosen and why."""
    if isinstance(intermediate, bool) or not isinstance(intermediate, int) or intermediate < 1:
        raise InputError(f"config.json intermediate_size is {intermediate!r}", "it must be a positive integer")
    alloc = allocate(intermediate, options.experts, options.top_k, options.shared, options.active)
    return replace(options, experts=alloc.experts, top_k=alloc.top_k, shared=alloc.shared), alloc.why


def validate_options(options: SplitOptions, intermediate: int, layers: int) -> None:
    o = options
    if o.experts < 1:
        raise UsageError(f"--experts must be at least 1 (got {o.experts})", "e.g. --experts 8")
    if not 1 <= o.top_k <= o.experts:
        raise UsageError(f"--top-k must be between 1 and --experts ({o.experts}), got {o.top_k}",
                         f"e.g. --top-k {min(2, o.experts)}")
    if o.shared < 0:
        raise UsageError(f"--shared must be 0 or more (got {o.shared})", "e.g. --shared 1")
    if o.experts + o.shared > intermediate:
        raise UsageError(f"{o.experts} experts + {o.shared} shared need more neurons than the FFN has "
                         f"({intermediate})", "use fewer experts")
    if o.pad_to < 1:
        raise UsageError(f"--pad-to must be at least 1 (got {o.pad_to})", "e.g. --pad-to 128 for block FP8")
    if not 0 < o.router_logit_std <= 1:
        raise UsageError(f"router_logit_std must be in (0, 1], got {o.router_logit_std}", "the default is 1e-5")
    if o.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {o.dtype!r}", f"choose one of: {', '.join(DTYPES)}")
    dense = dense_auto.parse_dense_layers(o.dense_layers)
    if isinstance(dense, dense_auto.DenseRequest):
        dense_auto.check_request(dense, layers, None)  # the budget is checked on the unresolved options
    else:
        bad = [i for i in dense if not 0 <= i < layers]
        if bad:
            raise UsageError(f"--dense-layers {bad} are outside 0..{layers - 1}", "give layer indices of this model")
    if o.calibration_tokens < 1:
        raise UsageError("--calibration-tokens must be positive", "e.g. --calibration-tokens 4096")
    check_device_name(o.device)
    if o.stream not in STREAMS:
        raise UsageError(f"unknown --stream {o.stream!r}", f"choose one of: {', '.join(STREAMS)}")
    for name in ("router_ridge", "down_ridge", "refine_lr"):
        value = getattr(o, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number (got {value})",
                             f"the default is {getattr(ActivationsMethod, name)}")
    if isinstance(o.reassign_rounds, bool) or not isinstance(o.reassign_rounds, int) or o.reassign_rounds < 0:
        raise UsageError(f"--reassign-rounds must be 0 (off) or more (got {o.reassign_rounds})",
                         "e.g. --reassign-rounds 3")
    if o.refine_steps < 0:
        raise UsageError(f"--refine-steps must be 0 (off) or more (got {o.refine_steps})", "e.g. --refine-steps 200")
    if o.refine_batch < 1:
        raise UsageError(f"--refine-batch must be at least 1 (got {o.refine_batch})", "e.g. --refine-batch 512")


# transformers 5 runs experts through grouped matmuls that need 16-byte-aligned rows: an expert of 171
# neurons loads but fails at the first forward ("strides should be multiple of 16 bytes"). Eight
# neurons keep every dtype down to 16 bits aligned, for at most 7 zero neurons per expert.
MIN_EXPERT_ALIGN = 8


def expert_size_for(intermediate: int, experts: int, shared: int, pad_to: int) -> int:
    size = math.ceil(intermediate / (experts + shared))
    align = math.lcm(pad_to, MIN_EXPERT_ALIGN)
    return math.ceil(size / align) * align


def plan_target(config: dict[str, Any], options: SplitOptions) -> tuple[TargetArch, TargetPlan]:
    """The target architecture and expert layout that config.json and the options give, checked.

    Needs config.json only, so `moeify validate` on a machine without the weights runs the very checks
    that `plan_split` runs before it looks at the tensors.
    """
    family = source_family(config)
    inter, layers = config["intermediate_size"], config["num_hidden_layers"]
    if None in (options.experts, options.top_k, options.shared):  # plan_split passes them resolved already
        _check_dense_request(options, layers)
        options, _ = resolve_layout(options, inter)
    validate_options(options, inter, layers)
    target = target_arch(family.choose_target(options.shared, options.target))
    size = expert_size_for(inter, options.experts, options.shared, options.pad_to)
    dense = dense_auto.parse_dense_layers(options.dense_layers)
    if isinstance(dense, dense_auto.DenseRequest):  # planned without dense layers until the screen has chosen
        dense_auto.require_dense_target(target)
        dense_auto.require_screenable(options.method)
        dense = []
    tplan = TargetPlan(options.experts, options.top_k, options.shared, size, dense)
    target.check(config, tplan, family)
    return target, tplan


def _layout_fixed(options: SplitOptions) -> bool:
    """True when the user's options fix the MoE layout whatever the ratio (so `auto` cannot re-budget it):
    --top-k with --shared, or --top-k without --active (a concrete routed layout, honoured as given)."""
    return options.top_k is not None and (options.shared is not None or options.active is None)


def _auto_ratio(options: SplitOptions) -> float | None:
    """The whole-model ratio `--dense-layers auto` budgets for; None when the layout is fixed by the user."""
    if _layout_fixed(options):
        return None
    return DEFAULT_ACTIVE if options.active is None else options.active


def _check_dense_request(options: SplitOptions, layers: int) -> None:
    """An `auto:N` the budget cannot hold fails with the other option checks, before any work (unresolved
    options only: they still say whether the user fixed the layout)."""
    request = dense_auto.dense_request(options.dense_layers)
    if request is not None:
        dense_auto.check_request(request, layers, _auto_ratio(options))


def plan_split(model: str | Path, options: SplitOptions, reporter: Reporter = SILENT, revision: str | None = None,
               token: str | None = None, source: Source | None = None) -> SplitPlan:
    """Resolve and validate everything; fail here, in seconds, rather than after the long work."""
    source = source or resolve_source(model, revision=revision, token=token, reporter=reporter)
    config = load_json(source.folder / "config.json", "config.json")
    family = source_family(config)
    reader = CheckpointReader(source.folder)
    check_checkpoint(reader, config)  # config.json against the tensors (headers only), before any option math
    inter, layers = config["intermediate_size"], config["num_hidden_layers"]
    _check_dense_request(options, layers)
    options, layout_why = resolve_layout(options, inter)
    target, tplan = plan_target(config, options)

    dtype = DTYPES[options.dtype] or reader.info(family.ffn_tensors(0)[0]).dtype
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise InputError(f"FFN weights are stored as {dtype}", "split an unquantized (16/32-bit) checkpoint")
    specs = _plan_tensors(reader, family, target, tplan, config, dtype)
    target_config = target.build_config(config, tplan)
    target_config["dtype"] = str(dtype).removeprefix("torch.")
    target_config.pop("torch_dtype", None)
    dropped = sorted(k for k in config if k not in CARRIED_KEYS and k not in IGNORED_KEYS and k not in target_config)
    return SplitPlan(source, config, target, tplan, target_config, specs, inter, layers, dtype, dropped, options,
                     layout_why)


def _plan_tensors(reader: CheckpointReader, family, target: TargetArch, plan: TargetPlan, config: dict[str, Any],
                  dtype: torch.dtype) -> list[TensorSpec]:
    """All output tensors in writing order: globals first, then each layer, then the rest."""
    hidden = config["hidden_size"]
    head, by_layer, tail = _carried_names(reader, family, config["num_hidden_layers"])
    specs = _carried(reader, family, target, config, head)
    m, e = plan.expert_size, plan.experts
    for i in range(config["num_hidden_layers"]):
        specs += _carried(reader, family, target, config, by_layer.get(i, []))
        specs += [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in target.extra_tensors(config, i, dtype).items()]
        if i in plan.dense_layers:
            names = target.dense_names(i)
            specs += _ffn_specs(names, config["intermediate_size"], hidden, dtype)
            continue
        specs.append(TensorSpec(target.router_name(i), torch.float32, (e, hidden)))
        for j in range(e):
            specs += _ffn_specs(target.expert_names(i, j), m, hidden, dtype)
        shared = target.shared_names(i)
        if shared is not None:
            specs += _ffn_specs(shared, plan.shared * m, hidden, dtype)
            specs.append(TensorSpec(target.shared_gate_name(i), torch.float32, (1, hidden)))
    specs += _carried(reader, family, target, config, tail)
    return specs


def _carried_names(reader: CheckpointReader, family, layers: int) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """Tensors copied unchanged: before the layers (embeddings), per layer (attention, norms), after."""
    ffn = {n for i in range(layers) for n in family.ffn_tensors(i)}
    head, tail, by_layer = [], [], {}
    for name in reader.names():
        if name in ffn:
            continue
        m = _LAYER.match(name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(name)
        elif name.startswith("model.embed_tokens"):
            head.append(name)
        else:
            tail.append(name)
    return head, {i: sorted(names) for i, names in by_layer.items()}, tail


def _carried(reader: CheckpointReader, family, target: TargetArch, config: dict[str, Any], names: list[str]
             ) -> list[TensorSpec]:
    """The output specs of copied tensors, planned on the meta device through the family's conversion."""
    specs = []
    for name in names:
        info = reader.info(name)
        meta = torch.empty(info.shape, dtype=info.dtype, device="meta")
        specs += [TensorSpec(target.rename(n), t.dtype, tuple(t.shape))
                  for n, t in family.convert_tensor(name, meta, config).items()]
    return specs


def _ffn_specs(names, size: int, hidden: int, dtype: torch.dtype) -> list[TensorSpec]:
    return [TensorSpec(names.gate, dtype, (size, hidden)), TensorSpec(names.up, dtype, (size, hidden)),
            TensorSpec(names.down, dtype, (hidden, size))]


def split_model(model: str | Path, output: str | Path, options: SplitOptions | None = None, *,
                overwrite: bool = False, reporter: Reporter = SILENT, revision: str | None = None,
                token: str | None = None) -> dict[str, Any]:
    """Convert `model` into an MoE checkpoint at `output`; returns the summary recorded in moeify.json."""
    options = options or SplitOptions()
    started = time.perf_counter()
    check_device_name(options.device)
    compute = Compute.for_device(resolve_device(options.device))  # an absent GPU fails first, before any output
    plan = plan_split(model, options, reporter, revision, token)
    output = Path(output)
    check_output_path(output, [plan.source.folder], overwrite)
    dense_choice = None
    if dense_auto.dense_request(options.dense_layers) is not None:
        plan, dense_choice = _resolve_dense_auto(plan, options, reporter, compute)
    options = plan.options
    method = make_method(options.method)
    reporter.note(plan.layout_why)
    if options.shared == 0 and options.top_k < options.experts:
        reporter.note("no shared experts: splits without them measured 2-10x worse perplexity out of domain "
                      "(docs/quality.md); add --shared N, or leave --top-k out and let --active choose")
    reader = CheckpointReader(plan.source.folder)
    family = source_family(plan.config)
    tplan = plan.target_plan
    if plan.padding:
        reporter.note(f"experts padded with {plan.padding} zero neurons per layer (expert size {tplan.expert_size}"
                      f"{f', a multiple of {options.pad_to}' if options.pad_to > 1 else ''}); outputs are unchanged")
    if plan.dropped_config_keys:
        reporter.note(f"config keys not carried to {plan.target.architecture}: {', '.join(plan.dropped_config_keys)}")
    ctx = SplitContext(plan.source.folder, reader, plan.config, family, plan.target, tplan.experts, tplan.top_k,
                       tplan.shared, tplan.expert_size, options.seed, reporter, options.calibration,
                       options.calibration_tokens, tuple(tplan.dense_layers), method_settings(options),
                       compute)
    planned = time.perf_counter()
    with atomic_output(output, overwrite, on_stale=lambda p: reporter.note(f"removed {p.name}, left by a killed run")) \
            as tmp:
        method.prepare(ctx)
        layer_info = _stream(plan, reader, family, method, tmp, options, reporter, compute)
        written = time.perf_counter()
        (tmp / "config.json").write_text(json.dumps(plan.target_config, indent=2) + "\n")
        side = copy_side_files(plan.source.folder, tmp)
        summary = {
            "source": {**plan.source.describe(), "model_type": plan.config.get("model_type"),
                       "config_hash": config_hash(plan.config)},
            "target": plan.target.name,
            "architecture": plan.target.architecture,
            "options": {**asdict(options), "expert_size": tplan.expert_size},
            "layout_choice": plan.layout_why,
            "expert_size": tplan.expert_size,
            "padding_neurons_per_layer": plan.padding,
            "activation_ratio": round(plan.activation_ratio, 6),
            "dense_layers": tplan.dense_layers,
            **({"dense_layers_auto": dense_choice.record()} if dense_choice is not None else {}),
            "layers": layer_info,
            "method_info": method.finish(),
            "copied_files": side,
            "dropped_config_keys": plan.dropped_config_keys,
            "output_bytes": sum(s.nbytes for s in plan.specs),
            "notes": getattr(reporter, "notes", []),
            "timings_s": {"plan": round(planned - started, 3), "split_and_write": round(written - planned, 3),
                          "total": round(time.perf_counter() - started, 3)},
        }
        write_metadata(tmp, "split", summary, moeify_version=__version__)
    return {"output": str(output), **summary}


def _resolve_dense_auto(plan: SplitPlan, requested: SplitOptions, reporter: Reporter, compute: Compute
                        ) -> tuple[SplitPlan, dense_auto.DenseChoice]:
    """`--dense-layers auto`: screen `plan` (planned with no dense layers), choose the layers, and plan again
    with them and the MoE layout re-resolved for the ratio they leave (moeify.split.dense_auto)."""
    request = dense_auto.dense_request(requested.dense_layers)
    ratio = _auto_ratio(requested)
    started = time.perf_counter()
    errors, tokens = dense_auto.screen_layers(plan, plan.options, reporter, compute)
    choice = dense_auto.choose(errors, request, ratio, tokens, plan.options.method)
    choice.seconds = time.perf_counter() - started
    if choice.layers:
        replanned = replace(requested, dense_layers=choice.layers)
        if ratio is not None:  # the MoE layers get what the dense ones leave of the budget
            replanned = replace(replanned, active=choice.moe_ratio)
        plan = plan_split(plan.source.folder, replanned, source=plan.source)
    p = plan.target_plan
    moe = (f"MoE layers: {p.experts} routed (top-{p.top_k}) + {p.shared} shared, "
           f"{(p.top_k + p.shared) / (p.experts + p.shared):.0%} of their FFN")
    asked = "" if ratio is None else f" ({'asked' if requested.active is not None else 'default --active'} {ratio:.0%})"
    total = f"total {plan.activation_ratio:.1%} of the FFN per token{asked}"
    if ratio is None and choice.layers:
        total += "; --top-k/--shared fix the MoE layout, so the dense layers add to its share"
    options = replace(plan.options, active=requested.active, dense_layers=list(p.dense_layers))
    plan = replace(plan, options=options, layout_why=f"{choice.summary()}; {moe}; {total}")
    return plan, choice


def _stream(plan: SplitPlan, reader: CheckpointReader, family, method, folder: Path, options: SplitOptions,
            reporter: Reporter, compute: Compute = CPU) -> list[dict[str, Any]]:
    target, tplan = plan.target, plan.target_plan
    layer_info = []
    head, carried_by_layer, tail = _carried_names(reader, family, plan.layers)
    # A method that gathers stored rows as they are (weights) takes the FFN in the checkpoint's dtype: a
    # float32 copy of the layer and the conversion of every expert back would only cost time.
    ffn_dtype = None if method.stored_dtype else torch.float32
    with ShardedWriter(folder, plan.specs, options.max_shard_bytes, metadata={"moeify_version": __version__}) as w:
        _copy(reader, w, family, target, plan.config, head)
        for i in reporter.track(range(plan.layers), "Splitting layers", total=plan.layers):
            _copy(reader, w, family, target, plan.config, carried_by_layer.get(i, []))
            for name, tensor in target.extra_tensors(plan.config, i, plan.dtype).items():
                w.write(name, tensor)
            ffn = family.load_ffn(reader, i, ffn_dtype)  # checked finite as read
            if i in tplan.dense_layers:
                dense_names = target.dense_names(i)
                for n, t in zip((dense_names.gate, dense_names.up, dense_names.down), (ffn.gate, ffn.up, ffn.down),
                                strict=True):
                    w.write(n, t.to(plan.dtype))
                layer_info.append({"layer": i, "dense": True})
                continue
            with compute.autocast():  # this layer's tensors on the device; bf16 products there, float32 on CPU
                moe = method.build(i, FFNWeights(*(compute.put(t, ffn_dtype) for t in (ffn.gate, ffn.up, ffn.down))))
            del ffn
            _write_moe_layer(w, target, tplan, i, moe, plan.dtype, options.router_logit_std)
            layer_info.append({"layer": i, "expert_sizes": [e.size for e in moe.experts],
                               "shared_size": moe.shared.size if moe.shared is not None else 0, **moe.info})
            del moe  # written: the next layer's build must not run with this one's experts still held
            compute.release()  # and the memory it used goes back (GPU cache, CPU heap): flat at any depth
        _copy(reader, w, family, target, plan.config, tail)
    return layer_info


def _copy(reader: CheckpointReader, w: ShardedWriter, family, target: TargetArch, config: dict[str, Any],
          names: list[str]) -> None:
    for name in names:
        tensor = reader.get(name)
        check_finite(name, tensor)
        for n, t in family.convert_tensor(name, tensor, config).items():
            w.write(target.rename(n), t)


def _write_moe_layer(w: ShardedWriter, target: TargetArch, tplan: TargetPlan, layer: int, moe: MoELayer,
                     dtype: torch.dtype, router_logit_std: float) -> None:
    """Apply the target's output scaling so near-uniform routing weights make each selected expert count 1."""
    w.write(target.router_name(layer), (moe.router * router_logit_std).float().contiguous())
    scale = target.routed_scale(tplan)
    for j, expert in enumerate(moe.experts):
        names = target.expert_names(layer, j)
        w.write(names.gate, expert.gate.to(dtype))
        w.write(names.up, expert.up.to(dtype))
        w.write(names.down, (_widened(expert.down, dtype) * scale).to(dtype))
    shared_names = target.shared_names(layer)
    if shared_names is not None:
        hidden = moe.router.shape[1]
        block = moe.shared or FFNWeights(torch.zeros(0, hidden), torch.zeros(0, hidden), torch.zeros(hidden, 0))
        w.write(shared_names.gate, block.gate.to(dtype))
        w.write(shared_names.up, block.up.to(dtype))
        w.write(shared_names.down, (_widened(block.down, dtype) / target.shared_gate_value).to(dtype))
        w.write(target.shared_gate_name(layer), torch.zeros(1, hidden, dtype=torch.float32))


def _widened(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in the wider of its dtype and `dtype`, so that scaling it rounds once, as in float32.

    A bf16 tensor scaled for a bf16 output is computed in float32 and rounded by torch's kernels, the
    very bits of scaling a float32 copy; a bf16 tensor bound for a float32 output must be widened first.
    """
    return tensor.to(torch.promote_types(tensor.dtype, dtype))
