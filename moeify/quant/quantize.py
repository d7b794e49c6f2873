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

from moeify.errors import InputError
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


def prepare(input_dir: Path, scheme: str = "auto",
            experts_only: bool = False) -> tuple[CheckpointReader, dict, QuantPlan]:
    """Read headers and config and build the plan: everything that can fail fast, with no output yet."""
    reader = CheckpointReader(input_dir)
    config = load_json(Path(input_dir) / "config.json", "config.json")
    plan = build_plan(reader, config, scheme, experts_only)
    return reader, config, plan


def quantize_fp8(input_dir: str | Path, output: str | Path, scheme: str = "auto", experts_only: bool = False,
                 verify: bool = True, overwrite: bool = False, reporter: Reporter = SILENT,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> QuantizeResult:
    """Quantize the attention and MLP/expert projections of a checkpoint folder to FP8 e4m3."""
    input_dir, output = Path(input_dir), Path(output)
    check_output_path(output, [input_dir], overwrite)
    start = time.perf_counter()
    reader, config, plan = prepare(input_dir, scheme, experts_only)
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
            "source": str(input_dir.resolve()),
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
