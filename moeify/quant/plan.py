"""Which tensors of a checkpoint get quantized, and the full output plan, decided before any weight is read.

Quantized: the Linear projections of attention and of the MLP (dense MLP, every routed expert and the
shared expert), as DeepSeek-V3 does. Left in their source dtype, bit for bit: embeddings, lm_head, all
norms and biases, routers and Qwen2-MoE's shared-expert gate: they are small, and routing decisions
flip on small errors. The patterns are arch/names.py's, anchored so a router never catches a projection.

The plan (every output name, dtype and shape, and the output size) is built from the safetensors
headers alone, so an unsupported or already-quantized input fails in seconds, before any writing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from moeify.arch import names
from moeify.arch.consistency import check_checkpoint
from moeify.errors import InputError, UnsupportedModelError, UsageError
from moeify.io.reader import CheckpointReader
from moeify.io.writer import TensorSpec
from moeify.quant.fp8 import BLOCK, FP8_DTYPE, SCHEMES, scale_shape

# kind -> anchored pattern over the full tensor name. Order does not matter: they are disjoint. The FFN
# and router patterns come from arch/, which owns every expert and router name.
QUANTIZED_PATTERNS: dict[str, re.Pattern[str]] = {
    "attention": re.compile(r"^(?:.+\.)?self_attn\.(?:q_proj|k_proj|v_proj|o_proj)\.weight$"),
    "expert": names.EXPERT_WEIGHT,
    "shared_expert": names.SHARED_EXPERT_WEIGHT,
    "mlp": names.DENSE_FFN_WEIGHT,
}
# Kept on purpose (named in the metadata so readers know they are not FP8). Matched against module names.
ROUTER_PATTERN = names.ROUTER_MODULE
# Fused expert tensors ([experts, out, in]) are not a layout moeify writes or quantizes.
FUSED_EXPERTS = names.FUSED_EXPERTS
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", "weight_zero_point", "weight_packed")


@dataclass(frozen=True)
class QuantTarget:
    """One weight to quantize: its source name, kind, shape and the names it becomes."""

    name: str
    kind: str
    shape: tuple[int, int]
    source_dtype: torch.dtype
    scale_name: str
    scale_shape: tuple[int, ...]


@dataclass
class QuantPlan:
    scheme: str
    targets: dict[str, QuantTarget]
    kept: list[str]  # tensor names copied unchanged
    unquantized_modules: list[str]  # Linear-like modules left unquantized (for modules_to_not_convert/ignore)
    specs: list[TensorSpec]
    source_bytes: int
    output_bytes: int
    scheme_reason: str
    notes: list[str] = field(default_factory=list)

    @property
    def quantized_source_bytes(self) -> int:
        return sum(math.prod(t.shape) * t.source_dtype.itemsize for t in self.targets.values())

    @property
    def quantized_output_bytes(self) -> int:
        return sum(math.prod(t.shape) + 4 * math.prod(t.scale_shape) for t in self.targets.values())

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.targets.values():
            counts[t.kind] = counts.get(t.kind, 0) + 1
        return counts


def classify(name: str, experts_only: bool = False) -> str | None:
    """The kind of a quantized weight (`attention`, `mlp`, `expert`, `shared_expert`), or None to keep it."""
    for kind, pattern in QUANTIZED_PATTERNS.items():
        if pattern.match(name):
            if experts_only and kind == "attention":
                return None
            return kind
    return None


def check_not_quantized(config: dict, reader: CheckpointReader) -> None:
    """Refuse inputs that are already quantized: quantizing FP8 twice only adds error."""
    qc = config.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise InputError(f"{reader.folder}: the checkpoint is already quantized (quant_method {method!r})",
                         "quantize the bf16 original, or run `moeify dequantize` first")
    for name, info in reader.tensors.items():
        if info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or name.endswith(SCALE_SUFFIXES):
            raise InputError(f"{reader.folder}: tensor {name!r} is already quantized ({info.dtype})",
                             "quantize the bf16 original, or run `moeify dequantize` first")


def choose_scheme(shapes: dict[str, tuple[int, int]], requested: str) -> tuple[str, str]:
    """Resolve `auto`: block when every quantized dimension is a multiple of 128, else channel. Says why."""
    if requested not in SCHEMES and requested != "auto":
        raise UsageError(f"unknown scheme {requested!r}", f"choose one of: auto, {', '.join(SCHEMES)}")
    odd = sorted({d for shape in shapes.values() for d in shape if d % BLOCK})
    if requested != "auto":
        reason = "as requested (--scheme, or quantize.scheme in a recipe), not auto"
        if requested == "block" and odd:
            reason += (f"; dimensions {_fmt_dims(odd)} are not multiples of {BLOCK}, so edge blocks are "
                       "partial (transformers' CPU dequantization and vLLM's block kernels need full blocks)")
        return requested, reason
    if not shapes:
        return "channel", "nothing to quantize"
    if not odd:
        return "block", (f"every quantized dimension (incl. each expert's intermediate size) is a multiple "
                         f"of {BLOCK}")
    offenders = [n for n, s in shapes.items() if any(d % BLOCK for d in s)]
    only_experts = all(QUANTIZED_PATTERNS["expert"].match(n) for n in offenders)
    fix = ("pad the experts to a multiple of 128 with `moeify split` to get block scales" if only_experts
           else "block scales need a model whose hidden, attention and MLP sizes are multiples of 128")
    return "channel", (f"dimensions {_fmt_dims(odd)} are not multiples of {BLOCK} (e.g. {offenders[0]} "
                       f"{list(shapes[offenders[0]])}); {fix}")


def _fmt_dims(dims: list[int]) -> str:
    shown = ", ".join(str(d) for d in dims[:6])
    return shown + (", ..." if len(dims) > 6 else "")


def build_plan(reader: CheckpointReader, config: dict, scheme: str = "auto",
               experts_only: bool = False) -> QuantPlan:
    """Decide every output tensor from the headers; fails before any work on a bad input."""
    check_not_quantized(config, reader)
    for name, info in reader.tensors.items():
        module = name.rsplit(".", 1)[0] if "." in name else name
        if len(info.shape) == 3 and (FUSED_EXPERTS.search(module) or FUSED_EXPERTS.search(name)):
            raise UnsupportedModelError(
                f"{reader.folder}: tensor {name!r} holds fused experts {list(info.shape)}",
                "re-save it with transformers (it writes per-expert keys) or convert it with `moeify split`")
    check_checkpoint(reader, config)  # the output's config.json is the input's: it must fit the weights

    candidates: dict[str, str] = {}
    for name, info in reader.tensors.items():
        kind = classify(name, experts_only)
        if kind is None:
            continue
        if len(info.shape) != 2 or not info.dtype.is_floating_point:
            raise InputError(f"{reader.folder}: tensor {name!r} looks like a projection but is "
                             f"{info.dtype} {list(info.shape)}", "the checkpoint is not a supported layout")
        if info.numel == 0:
            continue
        candidates[name] = kind
    if not candidates:
        raise UnsupportedModelError(f"{reader.folder}: found no attention or MLP projections to quantize",
                                    "moeify quantizes Llama/Mistral/Qwen and Mixtral/Qwen-MoE checkpoints")

    shapes = {n: reader.tensors[n].shape for n in candidates}
    resolved, reason = choose_scheme(shapes, scheme)  # type: ignore[arg-type]
    suffix = "weight_scale_inv" if resolved == "block" else "weight_scale"
    targets: dict[str, QuantTarget] = {}
    specs: list[TensorSpec] = []
    kept: list[str] = []
    for name, info in reader.tensors.items():  # header order: keeps each layer's tensors together
        if name in candidates:
            sname = name[: -len("weight")] + suffix
            sshape = scale_shape(resolved, info.shape)  # type: ignore[arg-type]
            targets[name] = QuantTarget(name, candidates[name], info.shape, info.dtype, sname, sshape)  # type: ignore[arg-type]
            specs.append(TensorSpec(name, FP8_DTYPE, info.shape))
            specs.append(TensorSpec(sname, torch.float32, sshape))
        else:
            kept.append(name)
            specs.append(TensorSpec(name, info.dtype, info.shape))

    unquantized = sorted({n[: -len(".weight")] for n in kept
                          if n.endswith(".weight") and len(reader.tensors[n].shape) == 2
                          and not _is_embedding_or_norm(n)} | _always_kept(kept))
    return QuantPlan(resolved, targets, kept, unquantized, specs, reader.total_bytes(),
                     sum(s.nbytes for s in specs), reason)


def _is_embedding_or_norm(name: str) -> bool:
    module = name[: -len(".weight")]
    last = module.rsplit(".", 1)[-1]
    return "norm" in last or last in ("embed_tokens", "wte", "word_embeddings")


def _always_kept(kept: list[str]) -> set[str]:
    """lm_head is listed even when tied (absent from the files): loaders must not quantize it."""
    return {"lm_head"}
