"""`dequantize_checkpoint`: an FP8 checkpoint (moeify's or any DeepSeek-style / compressed-tensors FP8 one)
back to bf16 weights, for debugging and for tools that cannot read FP8.

Each FP8 weight becomes `bf16(fp8 * scale)`, computed in float32; every other tensor is copied bit for
bit; scale tensors are dropped and config.json loses its quantization_config.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeify.arch.consistency import check_checkpoint
from moeify.errors import InputError, UnsupportedModelError
from moeify.io.output import atomic_output, check_output_path
from moeify.io.reader import CheckpointReader, load_json
from moeify.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, TensorSpec
from moeify.metadata import read_metadata, write_metadata
from moeify.progress import SILENT, Reporter
from moeify.quant.formats import scheme_from_config
from moeify.quant.fp8 import BLOCK, FP8_DTYPE, check_finite, dequantize
from moeify.source import copy_side_files

SCALE_NAMES = ("weight_scale_inv", "weight_scale")
DROPPED = ("input_scale",)  # static activation scales mean nothing once weights are bf16 again


@dataclass
class DequantizeResult:
    output: Path
    scheme: str
    dequantized: int
    kept: int
    output_bytes: int

    def summary(self) -> dict[str, Any]:
        return {"output": str(self.output), "scheme": self.scheme, "dequantized_tensors": self.dequantized,
                "kept_tensors": self.kept, "output_bytes": self.output_bytes}


def _plan(reader: CheckpointReader, config: dict) -> tuple[str, int, dict[str, str], list[TensorSpec]]:
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise InputError(f"{reader.folder}: config.json quantization_config must be an object, not "
                         f"{type(qc).__name__}", "the config is corrupt")
    scheme = scheme_from_config(config)
    if scheme is None:
        if not config.get("quantization_config"):
            raise InputError(f"{reader.folder}: the checkpoint is not quantized (config.json has no "
                             "quantization_config)", "nothing to dequantize; use the folder as it is")
        method = config["quantization_config"].get("quant_method", "?")
        raise UnsupportedModelError(f"{reader.folder}: quantization {method!r} is not an FP8 format moeify "
                                    "reads",
                                    "moeify dequantizes block FP8 (quant_method fp8) and compressed-tensors "
                                    "float-quantized checkpoints")
    block_size = config["quantization_config"].get("weight_block_size") or [BLOCK, BLOCK]
    if scheme == "block" and (not isinstance(block_size, list) or len(block_size) != 2
                              or not all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 1 << 16
                                         for b in block_size)):
        raise InputError(f"{reader.folder}: weight_block_size {block_size!r} is not two positive integers",
                         "the config is corrupt")
    if scheme == "block" and block_size[0] != block_size[1]:
        raise UnsupportedModelError(f"{reader.folder}: block size {block_size} is not square",
                                    "moeify reads square FP8 blocks only")
    pairs: dict[str, str] = {}
    specs: list[TensorSpec] = []
    for name, info in reader.tensors.items():
        if name.endswith(SCALE_NAMES + DROPPED):
            continue
        if info.dtype == FP8_DTYPE:
            stem = name[: -len("weight")] if name.endswith(".weight") else None
            scale = next((stem + s for s in SCALE_NAMES if stem and stem + s in reader), None)
            if scale is None:
                raise InputError(f"{reader.folder}: FP8 tensor {name!r} has no weight_scale(_inv) beside it",
                                 "the checkpoint is incomplete or in a format moeify does not read")
            pairs[name] = scale
            specs.append(TensorSpec(name, torch.bfloat16, info.shape))
        elif info.dtype == torch.float8_e5m2:
            raise UnsupportedModelError(f"{reader.folder}: tensor {name!r} is float8_e5m2",
                                        "moeify reads e4m3 checkpoints only")
        else:
            specs.append(TensorSpec(name, info.dtype, info.shape))
    if not pairs:
        raise InputError(f"{reader.folder}: no FP8 weights found although config.json says {scheme!r}",
                         "the config and weights disagree")
    return scheme, int(block_size[0]), pairs, specs


def dequantize_checkpoint(input_dir: str | Path, output: str | Path, overwrite: bool = False,
                          reporter: Reporter = SILENT, max_shard_bytes: int = DEFAULT_SHARD_BYTES
                          ) -> DequantizeResult:
    input_dir, output = Path(input_dir), Path(output)
    check_output_path(output, [input_dir], overwrite)
    reader = CheckpointReader(input_dir)
    config = load_json(input_dir / "config.json", "config.json")
    scheme, block, pairs, specs = _plan(reader, config)
    check_checkpoint(reader, config)  # the output keeps this config.json: it must fit the weights
    wanted = [s.name for s in specs]
    previous = read_metadata(input_dir)
    with atomic_output(output, overwrite) as tmp:
        with ShardedWriter(tmp, specs, max_shard_bytes) as writer:
            tensors = reader.iter_tensors(wanted)
            for name, tensor in reporter.track(tensors, "dequantizing", total=len(wanted)):
                scale_name = pairs.get(name)
                if scale_name is None:
                    writer.write(name, tensor)
                    continue
                scale = reader.get(scale_name)
                check_finite(scale_name, scale.float())  # a NaN scale would silently poison a whole block
                if scale_name.endswith("_inv"):
                    values = dequantize(tensor, scale, "block", block)
                else:
                    values = dequantize(tensor, _broadcastable_scale(scale, tensor), "channel")
                check_finite(name, values)  # e4m3 has NaN codes too
                writer.write(name, values.to(torch.bfloat16))
        out_config = copy.deepcopy(config)
        out_config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        copy_side_files(input_dir, tmp)
        write_metadata(tmp, "dequantize", {"source": input_dir.resolve().name, "from_scheme": scheme,
                                           "dequantized_tensors": len(pairs), "dtype": "bfloat16"}, previous)
    return DequantizeResult(output, scheme, len(pairs), len(specs) - len(pairs), sum(s.nbytes for s in specs))


def _broadcastable_scale(scale: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A compressed-tensors scale ([1], [], [out] or [out, 1]) shaped to multiply an [out, in] weight."""
    if scale.numel() == 1:
        return scale.reshape(1, 1)
    if scale.numel() == q.shape[0] and scale.ndim <= 2 and (scale.ndim < 2 or scale.shape[1] == 1):
        return scale.reshape(-1, 1)
    raise InputError(f"a weight_scale of shape {list(scale.shape)} fits no per-tensor or per-channel scheme "
                     f"for a weight of shape {list(q.shape)}",
                     "moeify reads tensor and channel FP8 scales only")
