"""`quantize_fp8`: a checkpoint folder in, an FP8 checkpoint folder out, one tensor in memory at a time.

Order of work: read the headers and config, build and check the whole plan (names, shapes, dtypes,
scheme, output size), only then open the output and stream tensors shard by shard in file order;
finally write config.json, moeify.json and the side files, and re-read everything to verify it.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeify.errors import InputError, UsageError
from moeify.io.output import atomic_output, check_output_path
from moeify.io.reader import CheckpointReader, load_json
from moeify.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter
from moeify.metadata import read_metadata, write_metadata
from moeify.progress import SILENT, Reporter
from moeify.quant.formats import quantization_config
from moeify.quant.fp8 import BLOCK, check_finite, quantize
from moeify.quant.plan import QuantPlan, build_plan
from moeify.quant.verify import VerifyReport, verify_output
from moeify.source import copy_side_files


@dataclass
class QuantizeResult:
    output: Path
    plan: QuantPlan
    seconds: float
    verify: VerifyReport | None
    side_files: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        p = self.plan
        data: dict[str, Any] = {
            "output": str(self.output),
            "scheme": p.scheme,
            "scheme_reason": p.scheme_reason,
            "quantized_tensors": len(p.targets),
            "quantized_by_kind": p.kinds(),
            "kept_tensors": len(p.kept),
            "unquantized_modules": len(p.unquantized_modules),
            "source_bytes": p.source_bytes,
            "output_bytes": p.output_bytes,
            "quantized_bytes_vs_bf16": round(p.quantized_output_bytes / max(1, _bf16_bytes(p)), 4),
            "seconds": round(self.seconds, 2),
        }
        if self.verify is not None:
            data["verify"] = self.verify.as_dict()
        return data


def _bf16_bytes(plan: QuantPlan) -> int:
    return sum(2 * t.shape[0] * t.shape[1] for t in plan.targets.values())


def prepare(input_dir: Path, scheme: str = "auto", experts_only: bool = False,
            tensor_parallel: int = 1) -> tuple[CheckpointReader, dict, QuantPlan]:
    """Read headers and config and build the plan: everything that can fail fast, with no output yet."""
    if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise UsageError(f"--tensor-parallel must be a positive integer (got {tensor_parallel})",
                         "the number of GPUs vLLM will shard the model over, e.g. --tensor-parallel 1")
    reader = CheckpointReader(input_dir)
    config = load_json(Path(input_dir) / "config.json", "config.json")
    plan = build_plan(reader, config, scheme, experts_only)
    if plan.scheme == "block":
        problem = block_expert_problem(plan, config, tensor_parallel)
        if problem and scheme == "block":
            raise UsageError(*problem)
        if problem:  # auto chose block from whole-matrix sizes; the per-rank expert slices do not fit it
            plan = build_plan(reader, config, "channel", experts_only)
            plan.scheme_reason = f"not block: {problem[0]}"
    return reader, config, plan


def expert_intermediate_sizes(plan: QuantPlan, hidden: int) -> dict[str, int]:
    """Per-expert intermediate size of every routed and shared expert matrix the plan quantizes."""
    sizes = {}
    for t in plan.targets.values():
        if t.kind in ("expert", "shared_expert"):
            out_f, in_f = t.shape
            sizes[t.name] = in_f if out_f == hidden else out_f
    return sizes


def block_expert_problem(plan: QuantPlan, config: dict, tensor_parallel: int = 1) -> tuple[str, str] | None:
    """Why vLLM cannot serve this MoE with block FP8, and the `moeify split --pad-to` that fixes it.

    vLLM shards each expert's intermediate dimension over the tensor-parallel ranks and its block-FP8
    MoE kernels tile each rank's slice in whole 128-wide blocks, so every expert's intermediate size
    must be a multiple of 128 x tensor_parallel. Checked from the plan (the headers), before any work.
    """
    hidden = config.get("hidden_size")
    sizes = expert_intermediate_sizes(plan, hidden if isinstance(hidden, int) else -1)
    need = BLOCK * tensor_parallel
    bad = sorted({s for s in sizes.values() if s % need})
    if not bad:
        return None
    name = next(n for n, s in sizes.items() if s in bad)
    per_rank = ", ".join(f"{s} / {tensor_parallel} = {s / tensor_parallel:g}" if tensor_parallel > 1 else str(s)
                         for s in bad[:4])
    message = (f"--scheme block: expert intermediate sizes {per_rank} per tensor-parallel rank are not multiples "
               f"of {BLOCK} (e.g. {name} {list(plan.targets[name].shape)}); vLLM's block-FP8 MoE kernels need "
               f"whole {BLOCK}-wide blocks per rank")
    hint = f"re-split with `moeify split ... --pad-to {need}` (experts padded to multiples of {need} neurons)"
    if isinstance(hidden, int) and hidden % BLOCK:
        hint = (f"hidden size {hidden} is not a multiple of {BLOCK} either, so no --pad-to makes block scales "
                f"fit this model: use --scheme channel")
    return message, hint


def quantize_fp8(input_dir: str | Path, output: str | Path, scheme: str = "auto", experts_only: bool = False,
                 verify: bool = True, overwrite: bool = False, reporter: Reporter = SILENT,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, tensor_parallel: int = 1) -> QuantizeResult:
    """Quantize the attention and MLP/expert projections of a checkpoint folder to FP8 e4m3.

    `tensor_parallel` is the degree vLLM will serve with: block scales need each rank's slice of every
    expert to be whole 128-wide blocks, which is checked before anything is written.
    """
    input_dir, output = Path(input_dir), Path(output)
    check_output_path(output, [input_dir], overwrite)
    start = time.perf_counter()
    reader, config, plan = prepare(input_dir, scheme, experts_only, tensor_parallel)
    reporter.note(f"scheme {plan.scheme}: {plan.scheme_reason}")
    previous = read_metadata(input_dir)

    with atomic_output(output, overwrite,
                       on_stale=lambda p: reporter.note(f"removed {p.name}, left by a killed run")) as tmp:
        with ShardedWriter(tmp, plan.specs, max_shard_bytes) as writer:
            tensors = reader.iter_tensors()
            for name, tensor in reporter.track(tensors, "quantizing", total=len(reader.tensors)):
                target = plan.targets.get(name)
                if target is None:
                    if tensor.is_floating_point():
                        check_finite(name, tensor)  # a NaN norm or embedding would be copied silently
                    writer.write(name, tensor)
                    continue
                q, scale = quantize(tensor, plan.scheme, name)  # type: ignore[arg-type]
                del tensor
                writer.write(name, q)
                writer.write(target.scale_name, scale)
        out_config = copy.deepcopy(config)
        out_config["quantization_config"] = quantization_config(plan.scheme, plan.unquantized_modules)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        side = copy_side_files(input_dir, tmp)
        report = None
        if verify:
            report = verify_output(reader, tmp, plan, reporter)
        record = {
            "source": input_dir.resolve().name,  # a folder name, not a path of this machine
            "format": "fp8_e4m3",
            "scheme": plan.scheme,
            "scheme_reason": plan.scheme_reason,
            "block_size": [BLOCK, BLOCK] if plan.scheme == "block" else None,
            "experts_only": experts_only,
            "quantized_by_kind": plan.kinds(),
            "unquantized_modules": plan.unquantized_modules,
            "kept_in_source_dtype": "embeddings, lm_head, norms, biases, routers, shared_expert_gate"
                                    + (", attention" if experts_only else ""),
            "output_bytes": plan.output_bytes,
            "verify": report.as_dict() if report else None,
        }
        write_metadata(tmp, "quantize", record, previous)
    return QuantizeResult(output, plan, time.perf_counter() - start, report, side)


def require_fp8_flag(fp8: bool) -> None:
    from moeify.errors import UsageError

    if not fp8:
        raise UsageError("choose a format to quantize to", "pass --fp8 (the only format for now)")


__all__ = ["QuantizeResult", "quantize_fp8", "prepare", "require_fp8_flag", "InputError"]
