"""One FFN as dense weights and as experts, plus the reference computations tests and eval compare against.

Conventions: a SwiGLU block computes `down @ (silu(gate @ x) * (up @ x))`; gate/up are [n, hidden],
down is [hidden, n]. A split layer is *sum-semantics*: its output is the sum of the selected experts
plus the shared experts, with weight 1 each. Target-specific scaling (routing-weight normalisation,
Qwen2-MoE's sigmoid gate) is applied only when writing, in `split.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class FFNWeights:
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def size(self) -> int:
        return self.gate.shape[0]

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Per-neuron SwiGLU activations silu(gate x) * (up x), [tokens, neurons].

        Without autograd the silu and the product run in place on the gate projection: the same values
        bit for bit, without two more [tokens, neurons] temporaries (0.73 -> 0.63 s for SmolLM2's FFN on
        32768 tokens; a split calls this about 80 times). With autograd the out-of-place form keeps what
        backward needs.
        """
        gate = F.linear(x, self.gate)
        if torch.is_grad_enabled() and (x.requires_grad or self.gate.requires_grad or self.up.requires_grad):
            return F.silu(gate) * F.linear(x, self.up)
        return F.silu(gate, inplace=True).mul_(F.linear(x, self.up))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.activations(x), self.down)

    def neurons(self, index: torch.Tensor, size: int | None = None) -> FFNWeights:
        """The block made of the given neurons, zero-padded to `size` (zero neurons output exactly 0)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.gate.device)
        size = size or len(index)
        if len(index) > size:
            raise ValueError(f"{len(index)} neurons do not fit in {size}")
        pad = size - len(index)
        gate, up = self.gate.index_select(0, index), self.up.index_select(0, index)
        down = self.down.index_select(1, index)
        if pad:
            gate, up = F.pad(gate, (0, 0, 0, pad)), F.pad(up, (0, 0, 0, pad))
            down = F.pad(down, (0, pad))
        return FFNWeights(gate, up, down)

    def to(self, dtype: torch.dtype) -> FFNWeights:
        return FFNWeights(self.gate.to(dtype), self.up.to(dtype), self.down.to(dtype))


@dataclass
class MoELayer:
    """A split FFN in sum-semantics: routed experts of equal size, optional shared block, a router.

    `router` is [experts, hidden] float32, scaled so its logits have roughly unit spread on typical
    inputs; split.py rescales it to the near-uniform regime that makes routing weights effectively 1.
    `dense` is set instead of experts when the layer stays dense (targets with mlp_only_layers).
    """

    experts: list[FFNWeights]
    router: torch.Tensor
    shared: FFNWeights | None = None
    dense: FFNWeights | None = None
    info: dict = field(default_factory=dict)

    def forward(self, x: torch.Tensor, top_k: int) -> torch.Tensor:
        """Reference MoE output: shared + the top-k experts by router logit, each with weight 1."""
        if self.dense is not None:
            return self.dense.forward(x)
        out = self.shared.forward(x) if self.shared is not None else torch.zeros_like(x)
        chosen = torch.topk(F.linear(x, self.router.to(x.dtype)), top_k, dim=-1).indices
        for e, expert in enumerate(self.experts):
            mask = (chosen == e).any(-1)
            if mask.any():
                out[mask] += expert.forward(x[mask])
        return out


def split_by_groups(ffn: FFNWeights, shared: torch.Tensor | None, groups: list[torch.Tensor], expert_size: int,
                    shared_size: int, router: torch.Tensor) -> MoELayer:
    """Gather neuron groups into padded experts (and the shared block) without changing any weight."""
    experts = [ffn.neurons(g, expert_size) for g in groups]
    shared_block = ffn.neurons(shared, shared_size) if shared_size else None
    padding = expert_size * len(groups) + shared_size - ffn.size
    return MoELayer(experts, router.float(), shared_block, info={"padding_neurons": int(padding)})
