"""Writing the trained model back as a standard checkpoint in exactly the input's layout.

transformers 5 holds experts fused in memory (arch/names.py: one [E, 2I, H] gate/up and one [E, H, I]
down tensor per layer); its `save_pretrained` would write them per expert again through its conversion
mapping, but the portable layout vLLM and transformers 4 load is the per-expert one `moeify split` wrote. So the
output takes the input's own tensor names, dtypes and shapes (the plan), fills each from the trained
model — slicing fused experts back apart, folding the router temperature into the router weight — and
streams them with `ShardedWriter`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moeify import __version__
from moeify.arch.names import fused_expert_slice, memory_name
from moeify.io.reader import CheckpointReader
from moeify.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, TensorSpec


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by checkpoint name, routers folded back to plain weights."""
    from moeify.finetune.moe_model import ScaledRouter

    out: dict[str, torch.Tensor] = {}
    routers = []
    for name, module in model.named_modules():
        if isinstance(module, ScaledRouter):
            out[f"{name}.weight"] = module.effective_weight().detach()
            routers.append(f"{name}.")
    for name, tensor in model.state_dict().items():
        if name.startswith(tuple(routers)):  # the training parametrisation, folded into `.weight` above
            continue
        out[name] = tensor.detach()
    return out


def checkpoint_tensor(name: str, trained: dict[str, torch.Tensor]) -> torch.Tensor:
    """The value of input tensor `name` in the trained model (per-expert names sliced from fused ones)."""
    name = memory_name(name)  # Mixtral's checkpoint block is `mlp` in transformers 5
    fused = fused_expert_slice(name)
    if fused:
        tensor, expert, role = fused
        if role == "down":
            return trained[tensor][expert]
        gate_up = trained[tensor][expert]
        half = gate_up.shape[0] // 2
        return gate_up[:half] if role == "gate" else gate_up[half:]
    if name in trained:
        return trained[name]
    if name == "lm_head.weight" and "model.embed_tokens.weight" in trained:
        return trained["model.embed_tokens.weight"]
    raise KeyError(f"the trained model has no tensor for {name!r}")


def write_like_input(model: nn.Module, source: Path, folder: Path,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write every tensor of `source` with its value from `model`, in the source's dtype and shape."""
    reader = CheckpointReader(source)
    trained = trained_tensors(model)
    specs = [TensorSpec(n, reader.info(n).dtype, tuple(reader.info(n).shape)) for n in reader.names()]
    with ShardedWriter(folder, specs, max_shard_bytes, metadata={"moeify_version": __version__}) as writer:
        for spec in specs:
            value = checkpoint_tensor(spec.name, trained)
            if tuple(value.shape) != spec.shape:
                raise RuntimeError(f"{spec.name}: trained shape {tuple(value.shape)} != input shape {spec.shape}")
            writer.write(spec.name, value.to(device="cpu", dtype=spec.dtype).contiguous())

