"""Per-layer screen of refinement variants on real SmolLM2 layers, without a whole split per variant.

    python bench/refine_screen.py capture DIR LAYERS [key=value ...]   # e.g. capture /tmp/scr 3,10,15,22
    python bench/refine_screen.py screen FILE VARIANT[,VARIANT ...]

`capture` runs the default split (SplitOptions from key=value) and saves, for each listed layer, what
refinement receives: the closed-form layer, its calibration inputs and target (tensors only, loaded back
with weights_only). It stops after the last listed layer. `screen` refines a saved layer per variant and
prints the relative error on the held-out calibration sequences (what refine.py judges by), before any
keep-if-better: `name[:key=value:...]` with steps, lr, batch, train (gate+up+down[+router]); name `ridge`
adds a ridge refit of the down projections on the training sequences after refinement (to the layer
refine_layer returns: the closed-form one where it refused the refined one), `router_ridge` a least-squares router refit
on the refined experts' output norms and then the ridge refit. docs/quality.md records a screen.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import moeify.split.methods.activations as act  # noqa: E402
from bench._models import smollm2_folder  # noqa: E402
from moeify.split.convert import SplitOptions, split_model  # noqa: E402
from moeify.split.methods import refine as R  # noqa: E402
from moeify.split.methods.repair import moe_output, refit_down, relative_error  # noqa: E402
from moeify.split.methods.router import expert_output_norms, fit_linear_router  # noqa: E402
from moeify.split.moe_layer import FFNWeights, MoELayer  # noqa: E402


class _Captured(Exception):
    pass


def _value(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def capture(folder: Path, layers: set[int], options: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    refine, seed0 = act.refine_layer, int(options.get("seed", 0))

    def saving_refine(moe, x, target, top_k, settings, chunk_len, seed=0):
        layer = seed - seed0
        if layer in layers:
            blocks = [[e.gate, e.up, e.down] for e in moe.experts]
            shared = None if moe.shared is None else [moe.shared.gate, moe.shared.up, moe.shared.down]
            torch.save({"experts": blocks, "shared": shared, "router": moe.router, "x": x, "target": target,
                        "top_k": top_k, "chunk_len": chunk_len, "seed": seed}, folder / f"layer{layer}.pt")
            print(f"saved layer {layer}", flush=True)
            if layer == max(layers):
                raise _Captured
        return refine(moe, x, target, top_k, settings, chunk_len, seed)

    act.refine_layer = saving_refine
    try:
        split_model(smollm2_folder(), folder / "split", SplitOptions(**options), overwrite=True)
    except _Captured:
        pass


def screen(path: Path, variants: list[str]) -> None:
    d = torch.load(path, weights_only=True)
    shared = None if d["shared"] is None else FFNWeights(*d["shared"])
    moe = MoELayer([FFNWeights(*b) for b in d["experts"]], d["router"], shared)
    x, target, k, seed = d["x"].float(), d["target"].float(), d["top_k"], d["seed"]
    train, held = R.heldout_split(x.shape[0], d["chunk_len"], 0.125)

    def choose(m: MoELayer, xs: torch.Tensor) -> torch.Tensor:
        return torch.topk(xs @ m.router.T, k, dim=-1).indices

    def held_error(m: MoELayer) -> float:
        return round(relative_error(moe_output(m, x[held], choose(m, x[held])), target[held]), 5)

    def ridge(m: MoELayer) -> MoELayer:
        return refit_down(m, x[train], target[train], choose(m, x[train]), act.ActivationsMethod.down_ridge)

    result: dict[str, object] = {"layer": path.name, "closed_form": held_error(moe)}
    for variant in variants:
        name, *pairs = variant.split(":")
        opts = dict(p.split("=") for p in pairs)
        settings = R.RefineSettings(int(opts.get("steps", 100)), float(opts.get("lr", R.RefineSettings.lr)),
                                    int(opts.get("batch", R.RefineSettings.batch)), 0.125,
                                    tuple(opts.get("train", "gate+up+down").split("+")))
        t0 = time.perf_counter()
        refined, info = R.refine_layer(moe, x, target, k, settings, d["chunk_len"], seed)
        error = info["error_heldout_after_refine"]  # the refined layer's, even where refine_layer kept moe
        if name == "ridge":
            error = held_error(ridge(refined))
        elif name == "router_ridge":
            router = fit_linear_router(x[train], expert_output_norms(refined.experts, x[train]))
            error = held_error(ridge(MoELayer(refined.experts, router, refined.shared)))
        result[variant] = {"error": error, "s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result), flush=True)


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "capture":
        options = {k: _value(v) for k, v in (a.split("=") for a in args[2:])}
        capture(Path(args[0]), {int(v) for v in args[1].split(",")}, options)
    elif mode == "screen":
        screen(Path(args[0]), args[1].split(","))
    else:
        raise SystemExit("usage: refine_screen.py capture DIR LAYERS [key=value ...] | screen FILE VARIANTS")


if __name__ == "__main__":
    main()
