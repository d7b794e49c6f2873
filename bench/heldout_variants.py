"""bench/heldout.py with an experimental change to the activations method patched in (ideas measured and not shipped).

    python bench/heldout_variants.py VARIANT [--chunks 4] [--workdir DIR] CONFIG [CONFIG ...]

VARIANT:
  readers      size every output (shared-expert scores, clustering features, the router's targets, the
               refinement loss) in the metric later layers read the residual stream in: dimension j weighted
               by the mean of w_j^2 over the RMSNorm gains of every later layer and the final norm (mean 1,
               floor 1e-3). The ridge repair fits each output dimension alone, so it is unchanged.
  accept       refinement's result is always kept, even where it lost to the closed-form layer on the held-out
               sequences. Measured (1.72x at 50%) on the code before 2026-12-05's fair comparison, when
               that closed form's repair had fitted the held-out sequences too, so the keep-if-better rule
               compared an in-sample error with an out-of-sample one; the shipped split now fits the
               repair on the training sequences whenever it refines.
  alpha=A      partial compensation: the repair and refinement target is dense_y + A x (dense residual -
               split residual); A = 1 is the shipped "compensate" stream.
CONFIG is as in bench/heldout.py. docs/quality.md records what each variant measured.
"""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import moeify.split.methods.activations as act  # noqa: E402
import moeify.split.methods.refine as R  # noqa: E402
from bench._models import smollm2_folder  # noqa: E402
from moeify.io.reader import CheckpointReader  # noqa: E402
from moeify.split.moe_layer import FFNWeights, MoELayer  # noqa: E402


def reader_weights(folder: Path) -> list[torch.Tensor]:
    """Per layer, the [hidden] weight of each output dimension: mean over later norms of gain^2, mean 1."""
    reader = CheckpointReader(folder)
    norms = {name: reader.get(name).double() for name in reader.names()
             if name.endswith("layernorm.weight") or name == "model.norm.weight"}
    layers = 1 + max(int(n.split(".")[2]) for n in norms if n.startswith("model.layers."))
    out = []
    for layer in range(layers):
        gains = [norms[f"model.layers.{i}.{kind}_layernorm.weight"]
                 for i in range(layer + 1, layers) for kind in ("input", "post_attention")]
        w = torch.stack([*gains, norms["model.norm.weight"]]).pow(2).mean(0)
        out.append((w / w.mean()).clamp_min(1e-3).float())
    return out


def _scaled(moe: MoELayer, s: torch.Tensor) -> MoELayer:
    """The layer with every down projection's rows multiplied by s (outputs measured in the weighted metric)."""
    def scale(block: FFNWeights) -> FFNWeights:
        return FFNWeights(block.gate, block.up, block.down * s[:, None].to(block.down.dtype))
    shared = None if moe.shared is None else scale(moe.shared)
    return MoELayer([scale(e) for e in moe.experts], moe.router, shared, moe.dense, dict(moe.info))


def patch_readers() -> None:
    weights = reader_weights(smollm2_folder())
    state: dict[str, torch.Tensor | None] = {"s": None}
    column_norms, output_norms, refine = act.column_norms, act._expert_output_norms, act.refine_layer
    split_layer = act.ActivationsMethod.split_layer

    def weighted_column_norms(down, rows=256):
        s = state["s"]
        return column_norms(down if s is None else down * s[:, None].to(down.device, down.dtype), rows)

    def weighted_output_norms(moe, feats, probe):
        s = state["s"]
        return output_norms(moe if s is None else _scaled(moe, s.to(feats.device)), feats, probe)

    def weighted_refine(moe, x, target, top_k, settings, chunk_len, seed=0):
        s = state["s"].to(x.device)
        refined, info = refine(_scaled(moe, s), x, target * s, top_k, settings, chunk_len, seed)
        return _scaled(refined, 1 / s), info

    def patched_split_layer(self, layer, ffn, x, target=None):
        state["s"] = weights[layer].sqrt()
        try:
            return split_layer(self, layer, ffn, x, target)
        finally:
            state["s"] = None

    act.column_norms, act._expert_output_norms, act.refine_layer = (weighted_column_norms, weighted_output_norms,
                                                                    weighted_refine)
    act.ActivationsMethod.split_layer = patched_split_layer


def patch_accept() -> None:
    error, refine = R._error, R.refine_layer
    calls: list[float] = []

    def first_is_worst(*args, **kwargs):
        value = error(*args, **kwargs)
        calls.append(value)
        return math.inf if len(calls) == 1 else value

    def accepting_refine(moe, x, target, top_k, settings, chunk_len, seed=0):
        calls.clear()
        R._error = first_is_worst
        try:
            refined, info = refine(moe, x, target, top_k, settings, chunk_len, seed)
        finally:
            R._error = error
        info["error_heldout_before_refine"] = round(calls[0], 5)
        return refined, info

    act.refine_layer = accepting_refine


def patch_alpha(alpha: float) -> None:
    def compensated_target(self, dense_y):
        return dense_y + alpha * (self.teacher.residual() - self.runner.residual())

    act.ActivationsMethod.compensated_target = compensated_target


def main() -> None:
    variant, rest = sys.argv[1], sys.argv[2:]
    if variant == "readers":
        patch_readers()
    elif variant == "accept":
        patch_accept()
    elif variant.startswith("alpha="):
        patch_alpha(float(variant.removeprefix("alpha=")))
    else:
        raise SystemExit(f"unknown variant {variant!r}: readers, accept or alpha=A")
    sys.argv = ["heldout.py", *rest]
    runpy.run_path(str(REPO / "bench" / "heldout.py"), run_name="__main__")


if __name__ == "__main__":
    main()
