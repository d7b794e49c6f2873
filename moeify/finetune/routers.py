"""Stage 1: fit each layer's router to the experts that best rebuild the dense FFN, one layer at a time.

No backpropagation through the model: the dense teacher is stepped layer by layer over calibration
tokens (moeify.split.calibrate.LayerRunner), and at each MoE layer every expert's output is computed on the
teacher's FFN inputs. A split layer is a sum of disjoint neuron blocks, so the error of any top-k choice
is a quadratic form in a small per-token Gram matrix of [dense - shared, expert_1..expert_E]; that gives
the best choice per token (exhaustively, or greedily for large E) and the error of any router cheaply.
The router is then trained (a linear classifier, full batch Adam, starting from the split's router) to
predict the best choice, and kept only if it lowers the error on held-out calibration sequences by more
than KEEP_MARGIN. Whole sequences are held out, not random tokens: neighbouring tokens of one sequence are
near copies of each other, and a token-level holdout passed routers that then made perplexity worse on
another text (docs/finetune.md).
Routers are written back in the near-uniform regime of `moeify split`, so the layer stays sum-semantics.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moeify.finetune.moe_model import expert_outputs, moe_blocks, shared_output, uniform_weight
from moeify.progress import SILENT, Reporter

MAX_EXHAUSTIVE = 512  # top-k choices enumerated per token before falling back to greedy selection
KEEP_MARGIN = 0.01  # a new router must lower the held-out error by 1% (relative) to replace the old one


@dataclass
class LayerFit:
    layer: int
    error_before: float  # relative squared error ||y - y_hat||^2 / ||y||^2 on held-out tokens
    error_after: float
    error_oracle: float  # the best any router could do with these experts
    agreement_before: float  # fraction of held-out tokens whose choice equals the oracle's
    agreement_after: float
    kept: bool  # False when the fitted router was not better and the old one stayed


def gram(block: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, weight: float,
         chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: Gram of [y - shared, w*f_1, ..., w*f_E] ([N, E+1, E+1]) and ||y||^2 ([N])."""
    grams = []
    for start in range(0, x.shape[0], chunk):
        xs, ys = x[start:start + chunk], y[start:start + chunk]
        residual = ys - shared_output(block, xs)
        vectors = torch.cat([residual[None], weight * expert_outputs(block, xs)])  # [E+1, n, H]
        grams.append(torch.einsum("anh,bnh->nab", vectors, vectors))
    return torch.cat(grams), (y * y).sum(-1)


def choice_errors(g: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Squared error of each choice (rows of the 0/1 `masks`, [C, E]) at each token: [N, C]."""
    residual = g[:, 0, 0]
    cross = g[:, 0, 1:] @ masks.T
    within = torch.einsum("nab,ca,cb->nc", g[:, 1:, 1:], masks, masks)
    return residual[:, None] - 2 * cross + within


def oracle_choice(g: torch.Tensor, top_k: int) -> torch.Tensor:
    """The 0/1 expert mask of the best top-k choice per token ([N, E])."""
    experts = g.shape[-1] - 1
    if math.comb(experts, top_k) <= MAX_EXHAUSTIVE:
        combos = torch.tensor(list(itertools.combinations(range(experts), top_k)))
        masks = torch.zeros(len(combos), experts).scatter_(1, combos, 1.0)
        return masks[choice_errors(g, masks).argmin(1)]
    chosen = torch.zeros(g.shape[0], experts)
    for _ in range(top_k):  # greedy: add the expert that lowers the error most
        base = chosen[:, None, :] + torch.eye(experts)[None]
        err = torch.einsum("n,ne->ne", g[:, 0, 0], torch.ones(g.shape[0], experts)) - 2 * torch.einsum(
            "na,nea->ne", g[:, 0, 1:], base) + torch.einsum("nab,nea,neb->ne", g[:, 1:, 1:], base, base)
        err = err.masked_fill(chosen.bool(), float("inf"))
        chosen.scatter_(1, err.argmin(1, keepdim=True), 1.0)
    return chosen


def router_choice(weight: torch.Tensor, x: torch.Tensor, top_k: int) -> torch.Tensor:
    indices = torch.topk(F.linear(x, weight), top_k, dim=-1).indices
    return torch.zeros(x.shape[0], weight.shape[0]).scatter_(1, indices, 1.0)


def masked_error(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token squared error of a per-token choice mask ([N, E])."""
    return g[:, 0, 0] - 2 * (g[:, 0, 1:] * mask).sum(1) + torch.einsum("nab,na,nb->n", g[:, 1:, 1:], mask, mask)


def train_router(weight: torch.Tensor, x: torch.Tensor, target: torch.Tensor, steps: int, lr: float,
                 seed: int) -> torch.Tensor:
    """Full-batch Adam on cross-entropy toward the oracle choice (uniform over its k experts)."""
    torch.manual_seed(seed)
    w = weight.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    soft = target / target.sum(1, keepdim=True)
    for _ in range(steps):
        opt.zero_grad()
        loss = -(soft * F.log_softmax(F.linear(x, w), dim=-1)).sum(1).mean()
        loss.backward()
        opt.step()
    return w.detach()


@torch.no_grad()
def fit_layer(block, x: torch.Tensor, y: torch.Tensor, top_k: int, weight: float, router_scale: float,
              steps: int = 200, lr: float = 1e-2, holdout: float = 0.2, seed: int = 0, layer: int = 0,
              seq_len: int = 1) -> LayerFit:
    """Fit one block's router in place (weight_unit and log_scale of its ScaledRouter).

    Rows of x are `seq_len`-token sequences one after another; a `holdout` share of whole sequences
    (at least one, when there are two or more) judges the new router.
    """
    router = block.gate
    g, _ = gram(block, x, y, weight)
    norm = (y * y).sum()
    test, train = _holdout_rows(x.shape[0], seq_len, holdout, seed + layer)
    n_test = len(test)
    target = oracle_choice(g, top_k)
    old = router.weight_unit.detach().float()
    with torch.enable_grad():
        new = train_router(old, x[train], target[train], steps, lr, seed + layer)
    test_norm = norm if n_test == 0 else (y[test] * y[test]).sum()
    idx = test if n_test else torch.arange(x.shape[0])

    def rel(w: torch.Tensor) -> float:
        return (masked_error(g[idx], router_choice(w, x[idx], top_k)).sum() / test_norm).item()

    def agree(w: torch.Tensor) -> float:
        return (router_choice(w, x[idx], top_k) == target[idx]).all(1).float().mean().item()

    before, after = rel(old), rel(new)
    keep = after < before * (1 - KEEP_MARGIN)
    oracle = (masked_error(g[idx], target[idx]).sum() / test_norm).item()
    fit = LayerFit(layer, round(before, 6), round(after if keep else before, 6), round(oracle, 6),
                   round(agree(old), 4), round(agree(new) if keep else agree(old), 4), keep)
    chosen = new if keep else old
    spread = F.linear(x, chosen).std().clamp_min(1e-12)
    router.weight_unit.copy_(chosen / spread)
    router.log_scale.fill_(math.log(router_scale))
    return fit


def _holdout_rows(rows: int, seq_len: int, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(test, train) row indices: a random `share` of whole sequences held out; all rows train if only one."""
    seq_len = max(1, min(seq_len, rows))
    sequences = rows // seq_len
    if sequences < 2:
        everything = torch.arange(rows)
        return torch.empty(0, dtype=torch.long), everything
    held = max(1, int(share * sequences))
    order = torch.randperm(sequences, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(sequences, dtype=torch.bool)
    mask[order[:held]] = True
    row_mask = mask.repeat_interleave(seq_len)
    row_mask = torch.cat([row_mask, torch.zeros(rows - len(row_mask), dtype=torch.bool)])
    return row_mask.nonzero().squeeze(1), (~row_mask).nonzero().squeeze(1)


def fit_routers(student: torch.nn.Module, teacher_folder: Path, tokens: torch.Tensor, router_scale: float,
                steps: int = 200, seed: int = 0, reporter: Reporter = SILENT) -> list[dict]:
    """Stage 1 over every MoE layer; returns one LayerFit record per layer (as dicts, for moeify.json)."""
    from moeify.arch import source_family
    from moeify.io.reader import CheckpointReader, load_json
    from moeify.split.calibrate import LayerRunner

    reader = CheckpointReader(teacher_folder)
    config = load_json(Path(teacher_folder) / "config.json", "config.json")
    family = source_family(config)
    blocks = {b.layer: b.block for b in moe_blocks(student)}
    top_k = student.config.num_experts_per_tok
    weight = uniform_weight(student)
    runner = LayerRunner(Path(teacher_folder), reader, config, tokens, reporter=reporter)
    fits = []
    student_device = next(student.parameters()).device
    for i in reporter.track(range(runner.layers), "Fitting routers", total=runner.layers):
        x = runner.ffn_input(i)
        ffn = family.load_ffn(reader, i)
        with torch.no_grad():
            y = ffn.forward(x)
        if i in blocks:
            block = blocks[i]
            fit = fit_layer(block, x.to(student_device), y.to(student_device), top_k, weight, router_scale,
                            steps=steps, seed=seed, layer=i, seq_len=tokens.shape[1])
            fits.append(asdict(fit))
        runner.advance(y)
    return fits
