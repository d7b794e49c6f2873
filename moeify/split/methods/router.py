"""Training-free routers: linear maps from the FFN input to a score per expert, fitted on calibration data.

The written router is linear and bias-free ([experts, hidden]) because that is all Mixtral and Qwen-MoE
gates are. Only the ordering of its logits matters (split.py makes the routing weights near-uniform),
so we fit it by least squares to what we want it to rank: each expert's true output norm on each
calibration token, the same quantity the oracle router ranks by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeify.split.moe_layer import FFNWeights


def gram_output_norms(acts: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """[tokens]: |acts @ down.T| per token from the block's Gram matrix, |a D^T|^2 = a (D^T D) a^T.

    For a block narrower than the hidden size this never forms the [tokens, hidden] output (writing and
    re-reading it per expert was the largest closed-form cost of SmolLM2's default split); the Gram matrix
    is summed in float64. acts: [tokens, m]; down: [hidden, m].
    """
    down = down.to(acts.dtype)
    gram = (down.T.double() @ down.double()).to(acts.dtype)  # [m, m]
    return ((acts @ gram) * acts).sum(dim=-1).clamp_min(0).sqrt()


def expert_output_norms(experts: list[FFNWeights], x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[tokens, experts]: |expert_e(x_t)|, what an oracle router would rank by."""
    cols = []
    for expert in experts:
        norms = [expert.forward(x[s:s + chunk]).norm(dim=-1) for s in range(0, x.shape[0], chunk)]
        cols.append(torch.cat(norms))
    return torch.stack(cols, dim=1)


def fit_linear_router(x: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Least squares W ([experts, hidden]) with x @ W.T ~ targets, ridge-regularised relative to the data scale.

    Targets are centred per token first: a linear router cannot add a bias, and only which experts beat
    the others at a token matters, not how loud the token is overall.
    """
    return LinearRouterFit(x, ridge).fit(targets)


class LinearRouterFit:
    """The ridge system of one layer's inputs, formed once and solved for any targets.

    Reassignment (reassign.py) refits the router to new experts several times on the same inputs; the
    Gram matrix is most of a fit's work. With fewer calibration tokens than hidden dimensions (a
    Llama-3-8B layer on 512 tokens) the same ridge solution comes from the tokens x tokens system,
    W^T = X^T (X X^T + lam I)^-1 T (push-through identity), at a fraction of the work.
    """

    def __init__(self, x: torch.Tensor, ridge: float = 1e-3):
        with torch.autocast(device_type=x.device.type, enabled=False):  # float64 normal equations everywhere
            self.x = x
            self.xd = x.double()
            tokens, hidden = self.xd.shape
            self.token_space = tokens < hidden
            if self.token_space:
                lam = ridge * self.xd.pow(2).sum() / hidden  # the mean of diag(X^T X), as below
                self.system = self.xd @ self.xd.T
                self.system.diagonal().add_(lam)
            else:
                gram = self.xd.T @ self.xd
                lam = ridge * gram.diagonal().mean()
                self.system = gram + lam * torch.eye(hidden, dtype=gram.dtype, device=gram.device)

    def fit(self, targets: torch.Tensor) -> torch.Tensor:
        """The router for `targets` ([tokens, experts]), scaled to unit logit spread on x."""
        with torch.autocast(device_type=self.x.device.type, enabled=False):
            t = targets.double()
            t = t - t.mean(dim=1, keepdim=True)
            if self.token_space:
                w = self.xd.T @ torch.linalg.solve(self.system, t)
            else:
                w = torch.linalg.solve(self.system, self.xd.T @ t)
            return unit_spread(w.T.float(), self.x.float())


def unit_spread(router: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rescale so logits on the calibration inputs have unit standard deviation (the MoELayer contract)."""
    std = F.linear(x, router).std()
    return router / std.clamp_min(1e-12)


def oracle_choices(experts: list[FFNWeights], x: torch.Tensor, top_k: int) -> torch.Tensor:
    """[tokens, top_k]: the experts whose true outputs are largest (the routing ceiling)."""
    return torch.topk(expert_output_norms(experts, x), top_k, dim=-1).indices
