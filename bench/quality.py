"""Quality of training-free splitting on the real SmolLM2-135M: writes docs/quality.md's tables.

    python bench/quality.py screen            # layer-level screening of method variants (held-out error)
    python bench/quality.py grid              # perplexity grid (in domain and out of domain), JSON lines

Calibration: Pride and Prejudice (../shared/data). Evaluation: Sense and Sensibility (in domain) and the
Wikipedia sample (out of domain), a few 512-token chunks each (the 2 CPU cores are shared). To keep the grid
affordable, split layers are evaluated in process: the dense transformers model with each FFN replaced by
the MoELayer the method built (router routing, or the oracle: the experts whose true outputs are largest).
bench/heldout.py scores real written splits loaded by stock transformers instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
torch.set_num_threads(2)

from bench._models import smollm2_folder  # noqa: E402
from moeify.data import load_tokenizer, tokenize_chunks  # noqa: E402
from moeify.progress import SILENT  # noqa: E402
from moeify.split.calibrate import LayerRunner  # noqa: E402
from moeify.split.convert import SplitOptions, plan_split  # noqa: E402
from moeify.split.methods import METHODS, SplitContext  # noqa: E402
from moeify.split.methods.repair import moe_output  # noqa: E402
from moeify.split.methods.router import oracle_choices  # noqa: E402
from moeify.split.moe_layer import FFNWeights, MoELayer  # noqa: E402


class CachedInputs:
    """The LayerRunner interface over dense FFN inputs computed once (no sequential compensation)."""

    def __init__(self, xs: list[torch.Tensor]):
        self.xs = xs

    def ffn_input(self, layer: int) -> torch.Tensor:
        return self.xs[layer]

    def advance(self, ffn_output: torch.Tensor) -> None:
        pass


def dense_inputs(folder: Path, tokens: torch.Tensor) -> list[torch.Tensor]:
    from moeify.io.reader import CheckpointReader, load_json

    reader = CheckpointReader(folder)
    runner = LayerRunner(folder, reader, load_json(folder / "config.json", "config"), tokens)
    xs = []
    for i in range(runner.layers):
        x = runner.ffn_input(i)
        p = f"model.layers.{i}.mlp."
        ffn = FFNWeights(*(reader.get(p + k + "_proj.weight", torch.float32) for k in ("gate", "up", "down")))
        runner.advance(ffn.forward(x))
        xs.append(x)
    return xs


def build_layers(folder: Path, method: str, experts: int, top_k: int, shared: int, calibration: str | None,
                 tokens: int, cached: list[torch.Tensor] | None = None, **attrs) -> tuple[list[MoELayer], dict]:
    """Run a method's per-layer build in process (what `moeify split` does, without writing)."""
    options = SplitOptions(experts=experts, top_k=top_k, shared=shared, method=method, calibration=calibration,
                           calibration_tokens=tokens)
    plan = plan_split(folder, options)
    from moeify.arch import source_family
    from moeify.io.reader import CheckpointReader

    reader = CheckpointReader(folder)
    family = source_family(plan.config)
    tp = plan.target_plan
    ctx = SplitContext(folder, reader, plan.config, family, plan.target, tp.experts, tp.top_k, tp.shared,
                       tp.expert_size, 0, SILENT, calibration, tokens, ())
    m = METHODS[method]()
    for k, v in attrs.items():
        setattr(m, k, v)
    if cached is not None and METHODS[method].needs_calibration:
        m.ctx = ctx
        m.runner, m.errors, m.calibrated_tokens, m.next_layer = CachedInputs(cached), [], cached[0].shape[0], 0
    else:
        m.prepare(ctx)
    layers = []
    for i in range(plan.layers):
        ffn = family.load_ffn(reader, i)
        layers.append(m.build(i, ffn))
    return layers, m.finish()


class PatchedFFN(torch.nn.Module):
    def __init__(self, moe: MoELayer, top_k: int, oracle: bool):
        super().__init__()
        self.moe, self.top_k, self.oracle = moe, top_k, oracle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.oracle:
            choices = oracle_choices(self.moe.experts, flat, self.top_k)
        else:
            choices = torch.topk(flat @ self.moe.router.T, self.top_k, dim=-1).indices
        return moe_output(self.moe, flat, choices).reshape(x.shape)


def perplexity(model, chunks: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for row in chunks:
            logits = model(row[None]).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
            count += row.numel() - 1
    return math.exp(total / count)


def patched_perplexity(model, layers: list[MoELayer] | None, top_k: int, oracle: bool, chunks) -> float:
    originals = [layer.mlp for layer in model.model.layers]
    try:
        if layers is not None:
            for layer, moe in zip(model.model.layers, layers, strict=True):
                layer.mlp = PatchedFFN(moe, top_k, oracle)
        return perplexity(model, chunks)
    finally:
        for layer, mlp in zip(model.model.layers, originals, strict=True):
            layer.mlp = mlp


def eval_sets(folder: Path, chunks: int) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(folder)
    return {name: tokenize_chunks(tok, (DATA / file).read_text(), 512, max_chunks=chunks)
            for name, file in (("sense", "sense_and_sensibility.txt"), ("wiki", "wikipedia_sample.txt"))}


CACHE = Path("/tmp/moeify-quality-cache")


def cached_inputs(folder: Path, calibration: str | None, tokens: int) -> list[torch.Tensor]:
    """Dense FFN inputs of every layer on the calibration tokens, computed once per (text, tokens)."""
    CACHE.mkdir(exist_ok=True)
    name = CACHE / f"x-{'pp' if calibration else 'mixed'}-{tokens}-spread.pt"  # chunks spread over the text
    if name.exists():
        return torch.load(name)
    from moeify.split.calibrate import calibration_tokens

    xs = dense_inputs(folder, calibration_tokens(folder, calibration, tokens))
    torch.save(xs, name)
    return xs


def parse_config(text: str) -> tuple[int, int, int]:
    experts, top_k, shared = (int(v) for v in text.split("x"))
    return experts, top_k, shared


def grid(argv: list[str]) -> None:
    """One JSON line per configuration: ppl with fitted router and with the oracle, in and out of domain.

    python bench/quality.py grid CHUNKS CONFIGS METHODS TOKENS [pp|mixed] [seq|comp]
    CONFIGS is a comma list of EXPERTSxTOPKxSHARED; `seq` calibrates each layer on the split layers' outputs
    and `comp` also targets the dense residual stream (ActivationsMethod.stream "split" / "compensate"),
    instead of reusing the cached dense inputs.
    """
    from transformers import AutoModelForCausalLM

    folder = smollm2_folder()
    chunks = int(argv[0])
    configs = [parse_config(c) for c in argv[1].split(",")]
    methods = argv[2].split(",")
    tokens = int(argv[3])
    calib = None if len(argv) > 4 and argv[4] == "mixed" else str(DATA / "pride_and_prejudice.txt")
    stream = {"seq": "split", "comp": "compensate"}.get(argv[5], "dense") if len(argv) > 5 else "dense"
    sequential = stream != "dense"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    sets = eval_sets(folder, chunks)
    t = time.perf_counter()
    if not os.environ.get("BENCH_SKIP_DENSE"):
        print(json.dumps({"config": "dense", **{k: round(perplexity(model, v), 3) for k, v in sets.items()},
                          "eval_s": round(time.perf_counter() - t, 1)}), flush=True)
    xs = None if sequential else cached_inputs(folder, calib, tokens)
    for experts, top_k, shared in configs:
        for method in methods:
            t = time.perf_counter()
            attrs = {"stream": stream} if sequential else {}
            layers, info = build_layers(folder, method, experts, top_k, shared, calib, tokens, cached=xs, **attrs)
            built = time.perf_counter() - t
            row = {"method": method, "experts": experts, "top_k": top_k, "shared": shared,
                   "activation": round((top_k + shared) / (experts + shared), 4), "split_s": round(built, 1),
                   "calibration": "P&P" if calib else "mixed", "tokens": tokens, "stream": stream}
            for name, chunk in sets.items():
                row[name] = round(patched_perplexity(model, layers, top_k, False, chunk), 3)
                row[f"{name}_oracle"] = round(patched_perplexity(model, layers, top_k, True, chunk), 3)
            row["eval_s"] = round(time.perf_counter() - t - built, 1)
            row.update({k: v for k, v in info.items() if k.startswith("mean_")})
            print(json.dumps(row), flush=True)


def heldout_inputs(folder: Path, name: str, tokens: int = 2048) -> list[torch.Tensor]:
    """Dense FFN inputs on a held-out text ("sense" in domain, "wiki" out of domain), for layer screening."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"x-{name}-{tokens}.pt"
    if path.exists():
        return torch.load(path)
    file = {"sense": "sense_and_sensibility.txt", "wiki": "wikipedia_sample.txt"}[name]
    chunks = tokenize_chunks(load_tokenizer(folder), (DATA / file).read_text(), 512, max_tokens=tokens)  # the first
    xs = dense_inputs(folder, chunks)
    torch.save(xs, path)
    return xs


def _screen_method():
    """ActivationsMethod with the router targets and groupings that `screen` compares (bench-only variants)."""
    import numpy as np

    from moeify.split.methods.activations import ActivationsMethod
    from moeify.split.methods.cluster import balanced_kmeans, reduce_features
    from moeify.split.methods.router import fit_linear_router, unit_spread

    class ScreenMethod(ActivationsMethod):
        router_target = "norm"  # norm (shipped) | lognorm | ce (Adam on cross-entropy to the oracle top-k)
        grouping = "patterns"  # patterns (shipped) | weights | firing (binary: above the token's median)

        def group(self, ffn, acts, routed, layer, down_norms=None):
            if self.grouping == "patterns":
                return super().group(ffn, acts, routed, layer, down_norms)
            if self.grouping == "weights":
                from moeify.split.methods.weights import neuron_features

                feats = neuron_features(ffn, routed, seed=0)
            else:
                rows = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(layer))[:2048]
                a = acts[rows][:, routed].abs()
                feats = reduce_features((a > a.median(dim=1, keepdim=True).values).float().T.numpy())
            labels = balanced_kmeans(feats, self.ctx.experts, capacity=self.ctx.expert_size, seed=layer)
            return [routed[torch.from_numpy(np.flatnonzero(labels == e))] for e in range(self.ctx.experts)]

        def fit_router(self, x, norms):
            if self.router_target == "lognorm":
                return fit_linear_router(x, norms.clamp_min(1e-6).log(), self.router_ridge)
            if self.router_target == "ce":
                w = fit_linear_router(x, norms, self.router_ridge).clone().requires_grad_(True)
                target = torch.zeros_like(norms).scatter_(1, torch.topk(norms, self.ctx.top_k, dim=-1).indices,
                                                          1.0 / self.ctx.top_k)
                opt = torch.optim.Adam([w], lr=1e-2)
                with torch.enable_grad():
                    for _ in range(200):
                        loss = -(target * torch.log_softmax(x @ w.T, -1)).sum(-1).mean()
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                return unit_spread(w.detach(), x)
            return super().fit_router(x, norms)

    return ScreenMethod


def screen(argv: list[str]) -> None:
    """Held-out layer reconstruction error, in and out of domain, on every 3rd layer (seconds per row).

    python bench/quality.py screen CONFIGS [VARIANT ...]
    CONFIGS: comma list of ROUTEDxTOPKxSHARED. VARIANT: comma list of key=value attributes of the method,
    e.g. down_ridge=0.1,repair=0 router_target=lognorm grouping=weights tokens=8192 calib=mixed.
    """
    from moeify.io.reader import CheckpointReader
    from moeify.split.methods.repair import relative_error

    folder = smollm2_folder()
    variants = argv[1:] or [""]
    held = {"sense": heldout_inputs(folder, "sense"), "wiki": heldout_inputs(folder, "wiki")}
    reader = CheckpointReader(folder)
    step = int(os.environ.get("BENCH_LAYER_STEP", "3"))
    for config in argv[0].split(","):
        experts, top_k, shared = parse_config(config)
        tp = plan_split(folder, SplitOptions(experts=experts, top_k=top_k, shared=shared)).target_plan
        for variant in variants:
            attrs = dict(kv.split("=") for kv in variant.split(",") if kv)
            tokens = int(attrs.pop("tokens", 4096))
            calib = None if attrs.pop("calib", "pp") == "mixed" else str(DATA / "pride_and_prejudice.txt")
            xs = cached_inputs(folder, calib, tokens)
            m = _screen_method()()
            for k, v in attrs.items():
                setattr(m, k, type(getattr(m, k))(float(v)) if isinstance(getattr(m, k), (bool, int, float))
                        else v)
            m.ctx = SimpleNamespace(experts=tp.experts, top_k=tp.top_k, shared=tp.shared,
                                    expert_size=tp.expert_size, seed=0, reader=reader)
            t = time.perf_counter()
            errors: dict[str, list[float]] = {}
            for i in range(0, len(xs), step):
                p = f"model.layers.{i}.mlp."
                ffn = FFNWeights(*(reader.get(p + k + "_proj.weight", torch.float32) for k in ("gate", "up", "down")))
                moe, _, _ = m.split_layer(i, ffn, xs[i])
                for name, ho in held.items():
                    y = ffn.forward(ho[i])
                    errors.setdefault(name, []).append(relative_error(moe_output(moe, ho[i], m.choices(moe, ho[i])), y))
                    oracle = oracle_choices(moe.experts, ho[i], top_k)
                    errors.setdefault(f"{name}_oracle", []).append(relative_error(moe_output(moe, ho[i], oracle), y))
            row = {"config": config, "activation": round((top_k + shared) / (experts + shared), 4),
                   "variant": variant or "shipped", "calibration": "mixed" if calib is None else "P&P",
                   "tokens": tokens, **{k: round(sum(v) / len(v), 4) for k, v in errors.items()},
                   "s": round(time.perf_counter() - t, 1)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    {"grid": grid, "screen": screen}[sys.argv[1]](sys.argv[2:])
