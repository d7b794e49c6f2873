"""`--method activations`: split by how neurons fire on calibration text, fit routers, repair the outputs.

Per layer, on the calibration tokens' FFN inputs X (the model run one layer at a time, split layers feeding
the next):
1. shared (generalist) experts: the neurons with the largest mean contribution |a_j| x |d_j| (those
   that matter for almost every token; DeepSeekMoE's and CMoE's idea);
2. routed experts: balanced k-means on each neuron's contribution pattern over tokens, so neurons that
   fire together land in the same expert; then a few rounds of router-aware reassignment (reassign.py)
   move each neuron to the expert the router picks where the neuron contributes;
3. router: least squares from X to each expert's true output norm (what the oracle ranks by);
4. repair: ridge refit of every down projection given the router's choices, to reproduce the dense output
   (by default the dense model's residual stream, so upstream error is compensated too; see `stream`).
With top-k equal to the number of experts nothing is routed away, so steps 3-4 are skipped and the split is
exact. Per-layer relative reconstruction errors (before and after repair, and with oracle routing) go to
moeify.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeify.data import TOKENIZER_FILES
from moeify.split.calibrate import LayerRunner, NeuronStats, calibration_tokens, ffn_activations
from moeify.split.methods.base import SplitContext, SplitMethod
from moeify.split.methods.cluster import balanced_kmeans, reduce_features
from moeify.split.methods.reassign import reassign
from moeify.split.methods.refine import RefineSettings, heldout_split, refine_layer
from moeify.split.methods.repair import joined_activations, moe_output, neuron_blocks, refit_down, relative_error
from moeify.split.methods.router import fit_linear_router, gram_output_norms
from moeify.split.moe_layer import FFNWeights, MoELayer, split_by_groups

PATTERN_TOKENS = 2048  # tokens whose activation pattern describes a neuron for clustering
ERROR_TOKENS = 2048  # calibration tokens on which the per-layer errors reported in moeify.json are measured


def pattern_features(acts: torch.Tensor, down_norms: torch.Tensor, tokens: int = PATTERN_TOKENS, seed: int = 0
                     ) -> torch.Tensor:
    """Each neuron as its unit-norm contribution pattern |a_j(t)| x |d_j| over a token sample ([n, tokens]).

    Takes the down columns' norms (`column_norms(down)`), not down itself: gathering a layer's down
    columns to take their norms cost more than the clustering (0.07 s + 0.05 s a 2048x8192 layer).
    Stays on the activations' device: the clustering runs there too.
    """
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(acts.shape[0], generator=g)[:tokens]
    pattern = acts[rows].abs() * down_norms  # [tokens, n]: the norms below reduce over contiguous rows
    pattern = pattern / pattern.pow(2).sum(0).sqrt().clamp_min(1e-12)
    return pattern.T.float()


def column_norms(down: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """|d_j| of every column of down ([hidden, n]), summed over row blocks: `down.norm(dim=0)` reduces
    across rows, a strided pass 2x slower on a CPU, and squaring the whole matrix at once doubles its memory."""
    total = torch.zeros(down.shape[1], dtype=torch.float32, device=down.device)
    for block in down.split(rows):
        total += block.float().pow(2).sum(0)
    return total.sqrt()


STREAMS = ("compensate", "split", "dense")


class ActivationsMethod(SplitMethod):
    name = "activations"
    needs_calibration = True
    settings = ("stream", "router_ridge", "down_ridge", "reassign_rounds", "refine_steps", "refine_lr", "refine_batch")
    # Which hidden states calibrate layer i+1 (docs/quality.md compares them on perplexity):
    #   "dense": the dense model's (every layer fitted in isolation);
    #   "split": the already-split layers' outputs (each layer fitted to the inputs it will really see);
    #   "compensate" (default): as "split", and each layer's repair targets the dense model's residual
    #   stream, so it also undoes the error the layers before it left (a second, dense stream runs alongside;
    #   calibration costs twice as much). Measured best of the three: 24 routed top-8 + 8 shared (50%),
    #   Sense and Sensibility 1.91x -> 1.75x dense, Wikipedia 10.3x -> 8.2x (calibrated on P&P).
    stream = "compensate"
    teacher: LayerRunner | None = None  # the dense stream, when stream == "compensate"
    repair = True
    router_ridge = 1e-3
    down_ridge = 1.0  # measured on held-out text: 1e-2 0.440, 1e-1 0.389, 1.0 0.386 (docs/quality.md)
    # Router-aware reassignment rounds after the grouping (reassign.py); 0 = off. Held-out geomean of SmolLM2
    # at 53248 tokens, 0 -> 3 rounds: 50% 1.675x -> 1.620x (seed 1: 1.756x -> 1.659x), 25% 2.902x -> 2.549x
    # (seed 1: 2.882x -> 2.541x), split 496-552 s on 2 idle cores (docs/quality.md).
    reassign_rounds = 3
    # Layer-local refinement steps after the closed-form steps (refine.py); 0 = off. 100 -> 150 steps (with the
    # faster repair, group norms and fused Adam that paid for them): held-out geomean of SmolLM2 50% 1.620x ->
    # 1.621x (seed 1: 1.659x -> 1.610x), 25% 2.549x -> 2.443x (seed 1: 2.541x -> 2.440x), split 444-509 s on
    # 2 idle cores (docs/quality.md).
    refine_steps = 150
    refine_lr = RefineSettings.lr
    refine_batch = RefineSettings.batch
    chunk_len = 512  # calibration sequence length, set in prepare(): refinement holds out whole sequences
    fallback: SplitMethod | None = None  # set when the model cannot be calibrated (no tokenizer)
    _split_output: torch.Tensor | None = None  # the split layer's output on x, for the next layer's input

    def prepare(self, ctx: SplitContext) -> None:
        super().prepare(ctx)
        self.fallback = None
        if not any((Path(ctx.folder) / name).is_file() for name in TOKENIZER_FILES):
            # A bare checkpoint without tokenizer files cannot be calibrated on text: say so, split data-free.
            from moeify.split.methods.weights import WeightsMethod

            ctx.reporter.note("no tokenizer in the model folder, so no calibration: fell back to --method weights "
                              "(copy the tokenizer files in for data-driven splitting)")
            self.fallback = WeightsMethod()
            self.fallback.prepare(ctx)
            return
        tokens = calibration_tokens(ctx.folder, ctx.calibration, ctx.calibration_tokens)
        ctx.reporter.note(f"calibrating on {tokens.numel()} tokens ({tokens.shape[0]} chunks of {tokens.shape[1]})")
        # One runner steps both streams through each loaded layer (the dense one is the teacher's view).
        streams = 2 if self.stream == "compensate" else 1
        self.runner = LayerRunner(ctx.folder, ctx.reader, ctx.config, tokens, reporter=ctx.reporter,
                                  streams=streams, compute=ctx.compute)
        self.teacher = self.runner.stream(1) if streams == 2 else None
        self.errors: list[dict[str, Any]] = []
        self.calibrated_tokens = int(tokens.numel())
        self.chunk_len = int(tokens.shape[1])
        self.next_layer = 0

    def _catch_up(self, layer: int) -> None:
        """Layers kept dense (never passed to build) still have to move the calibration stream forward."""
        while self.next_layer < layer:
            stored = self.ctx.family.load_ffn(self.ctx.reader, self.next_layer, dtype=None)
            dense = FFNWeights(*(self.ctx.compute.put(t) for t in (stored.gate, stored.up, stored.down)))
            self.runner.advance(dense.forward(self.runner.ffn_input(self.next_layer)))
            if self.teacher is not None:
                self.teacher.advance(dense.forward(self.teacher.ffn_input(self.next_layer)))
            self.next_layer += 1

    def build(self, layer: int, ffn: FFNWeights) -> MoELayer:
        if self.fallback is not None:
            return self.fallback.build(layer, ffn)
        self._catch_up(layer)
        x = self.runner.ffn_input(layer)
        self.next_layer = layer + 1
        target = None
        if self.teacher is not None:  # what this FFN must add to the split stream to land on the dense stream
            dense_y = ffn.forward(self.teacher.ffn_input(layer))
            target = self.compensated_target(dense_y)
            self.teacher.advance(dense_y)
        moe, y, info = self.split_layer(layer, ffn, x, target)
        if self.stream != "dense" and info.get("routed"):
            self.runner.advance(self._split_output)
        else:
            self.runner.advance(y)
        self._split_output = None
        moe.info.update(info)
        self.errors.append({"layer": layer, **info})
        return moe

    def compensated_target(self, dense_y: torch.Tensor) -> torch.Tensor:
        """The FFN output that puts the split stream back on the dense one: this layer's dense output plus the
        error every earlier split layer left in the residual stream (one home, so experiments override it)."""
        return self.teacher.residual() + dense_y - self.runner.residual()

    def choices(self, moe: MoELayer, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(x @ moe.router.T, self.ctx.top_k, dim=-1).indices

    def split_layer(self, layer: int, ffn: FFNWeights, x: torch.Tensor, target: torch.Tensor | None = None
                    ) -> tuple[MoELayer, torch.Tensor | None, dict[str, Any]]:
        """Split one FFN given its inputs x; the repair reproduces `target` (default: the dense FFN's output).

        Also returns the dense FFN's output on x, or None when `target` is given, the layer is routed and
        the stream is not the dense one (then nothing reads it).
        """
        ctx = self.ctx
        m, experts = ctx.expert_size, ctx.experts
        acts = ffn_activations(ffn, x)
        down_norms = column_norms(ffn.down)  # shared-expert scores and clustering features both use them
        # The dense output on these inputs: the goal without a target, and the next input where nothing is
        # routed or the stream is the dense one; the compensated stream has its target and never reads it.
        needed = target is None or ctx.top_k >= experts or self.stream == "dense"
        y = acts @ ffn.down.T if needed else None
        goal = y if target is None else target
        shared_idx, routed_idx = self.pick_shared(ffn, acts, down_norms)
        groups = self.group(ffn, acts, routed_idx, layer, down_norms)
        reassigned = None
        if self.reassign_rounds > 0 and experts > 1 and ctx.top_k < experts:
            fit_rows, held_rows = heldout_split(x.shape[0], self.chunk_len, RefineSettings.holdout)
            reassigned = reassign(groups, routed_idx, acts, ffn.down, x, ctx.top_k, m, self.reassign_rounds,
                                  fit_rows, held_rows, self.router_ridge)
            groups = reassigned.groups
        placeholder = torch.zeros(experts, ffn.gate.shape[1])
        moe = split_by_groups(ffn, shared_idx, groups, m, ctx.shared * m, placeholder)
        if ctx.top_k >= experts:
            moe.router = torch.eye(experts, ffn.gate.shape[1])  # any order: every expert runs
            return moe, y, {"routed": False}
        feats = joined_activations(acts, _layout(groups, shared_idx, m, ctx.shared * m))
        del acts
        probe = slice(0, ERROR_TOKENS)  # errors on a sample: the numbers, not the fit, are what this costs
        norms, at_probe = _expert_output_norms(moe, feats, probe)  # [tokens, experts]: what the oracle ranks by
        moe.router = self.fit_router(x, norms)
        chosen = self.choices(moe, x)
        oracle = torch.topk(norms[probe], ctx.top_k, dim=-1).indices
        info = {"routed": True,
                **({"reassign_shares": reassigned.shares, "reassign_kept": reassigned.kept} if reassigned else {}),
                "error_oracle": _probe_err(moe, x[probe], oracle, feats[probe], goal[probe], at_probe),
                "error_before_repair": _probe_err(moe, x[probe], chosen[probe], feats[probe], goal[probe], at_probe)}
        del at_probe
        unrepaired, refined = moe, False
        settings = RefineSettings(self.refine_steps, self.refine_lr, self.refine_batch)
        # Refinement is judged on sequences it never trained on, so the closed-form layer it is judged against
        # must not have seen them either: fitted on every token, the repair's held-out error is in-sample and
        # the keep-if-better rule refused refinements that helped (bench/heldout_variants.py `accept`: keeping
        # every refinement gave 1.72x against 1.80x at 50%). So when refining, the repair fits the training
        # sequences only, and where refinement loses, the closed form refit on every token ships (1.69x at 50%).
        # Where it wins, its down projections are refitted on every token (1.675x / 1.756x on two seeds, against
        # 1.691x / 1.789x without; the `refit` variant of bench/heldout_variants.py at 18d7a1e, docs/quality.md).
        refining = self.refine_steps > 0
        fit = heldout_split(x.shape[0], self.chunk_len, settings.holdout)[0] if refining else slice(None)
        if self.repair:
            moe = refit_down(unrepaired, x[fit], goal[fit], chosen[fit], self.down_ridge, feats=feats[fit])
            if refining:  # the closed form refinement starts from, on the probe tokens
                info["error_after_repair"] = _err(moe, x[probe], chosen[probe], feats[probe], goal[probe])
        if refining:
            moe, refine_info = refine_layer(moe, x, goal, ctx.top_k, settings, self.chunk_len, ctx.seed + layer)
            info.update(refine_info)
            refined = refine_info["refined"]
            if not refined and self.repair:
                moe = refit_down(unrepaired, x, goal, chosen, self.down_ridge, feats=feats)
        if refined:  # gate, up and the router moved: activations and routing are recomputed, once for both uses
            routed = self.choices(moe, x)
            feats = ffn_activations(neuron_blocks(moe)[0], x)
            if self.repair:  # refinement trained on the training sequences only: the repair now fits them all,
                moe = refit_down(moe, x, goal, routed, self.down_ridge, feats=feats)  # pulled to the refined downs
            self._split_output = moe_output(moe, x, routed, feats=feats)
            info["error_after_refine"] = round(relative_error(self._split_output[probe], goal[probe]), 5)
        else:  # the split stream's next input, computed once: its probe rows give the error after repair too
            self._split_output = moe_output(moe, x, chosen, feats=feats)
            if self.repair:
                info["error_after_repair"] = round(relative_error(self._split_output[probe], goal[probe]), 5)
        return moe, y, info

    def fit_router(self, x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """Least squares from the FFN input to each expert's output norm (bench/quality.py compares others)."""
        return fit_linear_router(x, norms, self.router_ridge)

    def pick_shared(self, ffn: FFNWeights, acts: torch.Tensor, down_norms: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared block = the neurons with the largest mean contribution; the rest are routed.

        `down_norms` may pass `column_norms(ffn.down)` when the caller has them already."""
        ctx = self.ctx
        n_shared = min(ctx.shared * ctx.expert_size, ffn.size - ctx.experts)
        if n_shared and down_norms is None:
            down_norms = column_norms(ffn.down)
        score = (acts.abs().mean(0) * down_norms) if n_shared else torch.zeros(ffn.size)
        order = torch.argsort(score, descending=True)
        return order[:n_shared].sort().values, order[n_shared:]  # the shared block gathered in order, too

    def group(self, ffn: FFNWeights, acts: torch.Tensor, routed: torch.Tensor, layer: int,
              down_norms: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Balanced k-means on contribution patterns: neurons that fire on the same tokens share an expert.

        `down_norms` may pass `column_norms(ffn.down)` when the caller has them already."""
        ctx = self.ctx
        down_norms = column_norms(ffn.down) if down_norms is None else down_norms
        patterns = pattern_features(acts[:, routed], down_norms[routed], seed=ctx.seed + layer)
        feats = reduce_features(patterns, seed=ctx.seed)
        labels = balanced_kmeans(feats, ctx.experts, capacity=ctx.expert_size, seed=ctx.seed + layer)
        # Each expert's neurons in ascending order: the order inside an expert does not change what it
        # computes, and gathering down columns in order is 3x faster than in k-means' order.
        return [routed[torch.from_numpy(np.flatnonzero(labels == e))].sort().values for e in range(ctx.experts)]

    def finish(self) -> dict[str, Any]:
        if self.fallback is not None:
            return {"fallback": "weights", "why": "no tokenizer in the model folder"}
        info: dict[str, Any] = {"calibration": self.ctx.calibration or "shipped default (mixed)",
                                "calibration_tokens": self.calibrated_tokens, "stream": self.stream,
                                "repair": self.repair}
        routed = [e for e in self.errors if e.get("routed")]
        for key in ("error_oracle", "error_before_repair", "error_after_repair"):
            values = [e[key] for e in routed if key in e]
            if values:
                info[f"mean_{key}"] = round(sum(values) / len(values), 5)
        return info


def _layout(groups: list[torch.Tensor], shared: torch.Tensor, size: int, shared_size: int) -> torch.Tensor:
    """Dense neuron index of every neuron of the split layer, in MoELayer order (-1 marks padding)."""
    def pad(index: torch.Tensor, to: int) -> torch.Tensor:
        return torch.cat([index.long(), torch.full((to - len(index),), -1, dtype=torch.long, device=index.device)])

    parts = [pad(g, size) for g in groups]
    if shared_size:
        parts.append(pad(shared, shared_size))
    return torch.cat(parts)


def _err(moe: MoELayer, x: torch.Tensor, choices: torch.Tensor, feats: torch.Tensor | None, y: torch.Tensor
         ) -> float:
    return round(relative_error(moe_output(moe, x, choices, feats=feats), y), 5)


# Expert outputs kept at the probe tokens for the errors before repair, when they fit in this many bytes
# (8 experts x 2048 tokens x hidden 2048 is 128 MiB; 64 experts at Llama-3-8B width would be 2 GiB, so
# there the two errors recompute their experts' outputs instead).
PROBE_OUTPUT_BYTES = 256 * 1024**2


def _expert_output_norms(moe: MoELayer, feats: torch.Tensor, probe: slice
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each routed expert's output norm at every token ([tokens, experts]), one expert at a time (stacking
    all outputs first held experts x tokens x hidden floats: 3.6 GB for SmolLM2's default split at 32768
    tokens), and the outputs at the probe tokens ([probe, experts, hidden]) when they fit PROBE_OUTPUT_BYTES.

    An expert narrower than the hidden size takes its norms from its Gram matrix, |a D^T|^2 = a (D^T D) a^T,
    without forming its output: writing and re-reading a [tokens, hidden] output per expert made this the
    largest closed-form step of SmolLM2's default split (48 experts of 24 neurons: 1.34 s a layer at 32768
    tokens, against 0.04 s; the norms agree to 3e-7 relative). Wider experts form their output (as cheap).
    """
    m, experts, hidden = moe.experts[0].size, len(moe.experts), moe.experts[0].down.shape[0]
    rows = len(range(*probe.indices(feats.shape[0])))
    keep = experts * rows * hidden * feats.element_size() <= PROBE_OUTPUT_BYTES
    # Filled in place: a list of `out[probe]` slices would keep every expert's whole output alive (they are
    # views), 3.9 GB more at the peak of SmolLM2's default split, measured.
    kept = torch.empty(rows, experts, hidden, dtype=feats.dtype, device=feats.device) if keep else None
    norms = []
    for e in range(experts):
        a, down = feats[:, e * m:(e + 1) * m], moe.experts[e].down.to(feats.dtype)
        if m < hidden:
            norms.append(gram_output_norms(a, down))
            if kept is not None:
                kept[:, e] = a[probe] @ down.T
            continue
        out = a @ down.T
        norms.append(out.norm(dim=-1))
        if kept is not None:
            kept[:, e] = out[probe]
        del out
    return torch.stack(norms, dim=1), kept


def _probe_err(moe: MoELayer, x: torch.Tensor, choices: torch.Tensor, feats: torch.Tensor, y: torch.Tensor,
               outputs: torch.Tensor | None) -> float:
    """`_err` from the routed experts' outputs already computed at these tokens, when they were kept."""
    if outputs is None:
        return _err(moe, x, choices, feats, y)
    hidden = outputs.shape[-1]
    out = outputs.gather(1, choices[:, :, None].expand(-1, -1, hidden)).sum(dim=1)
    if moe.shared is not None:
        out = out + feats[:, len(moe.experts) * moe.experts[0].size:] @ moe.shared.down.T
    return round(relative_error(out, y), 5)


# Re-exported for the stats-based tests and benches.
__all__ = ["ActivationsMethod", "NeuronStats", "pattern_features"]
