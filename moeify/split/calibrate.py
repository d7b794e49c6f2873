"""Run the dense model one decoder layer at a time over calibration tokens, and measure its FFN neurons.

Only one decoder layer's weights and the calibration hidden states are in memory: the model is built on
the meta device and each `model.layers[i]` is materialised from the checkpoint, run, and dropped. Using
the model's own decoder layer, rotary embedding and mask helpers keeps calibration bit-for-bit the
network the user converts (sliding windows, qk-norms, biases and all).

The runner stops halfway through each layer: `ffn_input(i)` returns the FFN input X (the
post-attention RMSNorm output) and the caller decides which FFN output to add before `advance()`;
passing the split layer's output instead of the dense one gives sequential error compensation (the next
layer is calibrated on what the converted model will actually see).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeify.arch import source_family
from moeify.arch.names import ffn_block
from moeify.device import CPU, Compute
from moeify.io.reader import CheckpointReader
from moeify.progress import SILENT, Reporter
from moeify.split.moe_layer import FFNWeights

DEFAULT_SEQ_LEN = 512
# Fraction of neurons counted as "firing" at a token: the ones with the largest |activation| x |down column|.
FIRE_FRACTION = 0.1


class _Capture(torch.nn.Module):
    """Stands in for a decoder layer's MLP: records its input and contributes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach())
        return torch.zeros_like(x)


def calibration_tokens(folder: Path, spec: str | None, max_tokens: int, seq_len: int = DEFAULT_SEQ_LEN
                       ) -> torch.Tensor:
    """[chunks, seq_len] token ids of the calibration text (shipped mixed default when `spec` is None)."""
    from moeify.data import load_text, load_tokenizer, tokenize_chunks

    tokenizer = load_tokenizer(folder)
    seq_len = min(seq_len, max_tokens)
    return tokenize_chunks(tokenizer, load_text(spec), seq_len, max_tokens=max_tokens, spread=True)


class LayerRunner:
    """The dense decoder stack stepped layer by layer over fixed token chunks, for one or more streams.

    A stream is one hidden-state sequence through the stack. Sequential compensation needs two (the split
    model's and the dense model's); both are stepped through each layer while it is loaded, so every
    layer's attention weights and the embedding matrix are read from disk once, not once per stream.
    `stream(s)` gives a view with the one-stream interface (`ffn_input`, `residual`, `advance`).

    Weights and hidden states live on `compute.device`; only the layer being run is materialised there,
    and it is dropped (to the meta device) as soon as every stream has passed it.
    """

    def __init__(self, folder: Path, reader: CheckpointReader, config: dict[str, Any], tokens: torch.Tensor,
                 batch: int = 8, reporter: Reporter = SILENT, streams: int = 1, compute: Compute = CPU):
        from transformers import AutoConfig, AutoModelForCausalLM

        if streams < 1:
            raise ValueError("a LayerRunner needs at least one stream")
        self.reader, self.batch, self.reporter, self.compute = reader, batch, reporter, compute
        self.hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        self.family = source_family(config)  # knows which tensors are the FFN the capture stands in for
        self.hf_config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32)
        self.inner = model.model
        self.layers = len(self.inner.layers)
        self.tokens = tokens
        device = compute.device
        embed = reader.get("model.embed_tokens.weight")
        # Gather the rows first, convert after: the float32 vocabulary matrix is never built.
        first = compute.put(F.embedding(tokens, embed))  # [chunks, seq, hidden]: the next layer's input
        del embed
        self.hidden: list[torch.Tensor] = [first] * streams  # replaced, never modified in place
        rotary_cls = type(self.inner.rotary_emb)
        self.rotary = rotary_cls(config=self.hf_config).to(device)
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0)
        self.position_ids = positions
        self.position_embeddings = self.rotary(first[:1], positions)
        self.masks = self._masks()
        self._layer: int | None = None  # the layer whose FFN inputs are held
        self._x: list[torch.Tensor | None] = [None] * streams
        self._mid: list[torch.Tensor | None] = [None] * streams

    @property
    def streams(self) -> int:
        return len(self.hidden)

    def stream(self, index: int) -> _Stream:
        """A one-stream view of stream `index` (what a second LayerRunner used to be)."""
        if not 0 <= index < self.streams:
            raise IndexError(f"stream {index} of {self.streams}")
        return _Stream(self, index)

    def _masks(self) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        probe = self.hidden[0][: self.batch]
        args = dict(config=self.hf_config, inputs_embeds=probe, attention_mask=None, cache=None,
                    position_ids=self.position_ids.expand(probe.shape[0], -1))
        masks = {"full_attention": create_causal_mask(**args)}
        types = getattr(self.hf_config, "layer_types", None) or []
        mistral_style = self.hf_config.model_type == "mistral" and getattr(self.hf_config, "sliding_window", None)
        if "sliding_attention" in types or mistral_style:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**args)
        if mistral_style:
            masks["full_attention"] = masks["sliding_attention"]
        return masks

    def _mask_for(self, layer: int, rows: int):
        types = getattr(self.hf_config, "layer_types", None)
        mask = self.masks[types[layer] if types else "full_attention"]
        if isinstance(mask, torch.Tensor) and mask.shape[0] != rows:
            mask = mask[:rows]
        return mask

    def _load_layer(self, layer: int) -> torch.nn.Module:
        module = self.inner.layers[layer]
        prefix = f"model.layers.{layer}."
        state = {n[len(prefix):]: self.compute.put(self.reader.get(n)) for n in self.reader.names()
                 if n.startswith(prefix) and not self.family.is_ffn_tensor(n)}
        found = ffn_block(module)
        if found is None:
            raise RuntimeError(f"layer {layer}: {type(module).__name__} has no FFN module to capture the input of")
        setattr(module, found[0], _Capture())
        module.to_empty(device=self.compute.device)
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        if unexpected or missing:
            raise RuntimeError(f"layer {layer}: checkpoint tensors do not fit the model ({missing or unexpected})")
        return module.eval()

    @torch.no_grad()
    def _run_layer(self, layer: int) -> None:
        """Load `layer` once and run every stream up to its FFN; the weights are dropped right after."""
        pending = [s for s, m in enumerate(self._mid) if m is not None]
        if pending:
            raise RuntimeError(f"layer {self._layer}: advance() stream {pending[0]} before running layer {layer}")
        module = self._load_layer(layer)
        capture = ffn_block(module)[1]  # the _Capture _load_layer put in the FFN's place
        try:
            with self.compute.autocast():
                for s, hidden in enumerate(self.hidden):
                    mids = []
                    for start in range(0, hidden.shape[0], self.batch):
                        h = hidden[start:start + self.batch]
                        rows = h.shape[0]
                        cos, sin = self.position_embeddings
                        out = module(h, attention_mask=self._mask_for(layer, rows),
                                     position_ids=self.position_ids.expand(rows, -1),
                                     position_embeddings=(cos.expand(rows, -1, -1), sin.expand(rows, -1, -1)))
                        mids.append((out[0] if isinstance(out, tuple) else out).float())
                    x = torch.cat(capture.seen).float()
                    capture.seen.clear()
                    self._x[s] = x.reshape(-1, x.shape[-1])
                    self._mid[s] = torch.cat(mids)
        finally:
            capture.seen.clear()
            module.to("meta")  # drop the weights: one layer in memory at a time
        self._layer = layer

    def ffn_input(self, layer: int, stream: int = 0) -> torch.Tensor:
        """Run layer `layer` up to its FFN; returns X, the FFN input of every token ([tokens, hidden]).

        The first call for a layer runs every stream through it; the others' inputs are then handed out
        from memory until that stream is advanced.
        """
        if self._layer != layer or self._mid[stream] is None:
            self._run_layer(layer)
        x = self._x[stream]
        if x is None:
            raise RuntimeError(f"stream {stream}: ffn_input({layer}) already consumed by advance()")
        return x

    def residual(self, stream: int = 0) -> torch.Tensor:
        """The residual stream after layer `i`'s attention ([tokens, hidden]), between ffn_input() and advance()."""
        mid = self._mid[stream]
        if mid is None:
            raise RuntimeError("call ffn_input() first")
        return mid.reshape(-1, mid.shape[-1])

    def advance(self, ffn_output: torch.Tensor, stream: int = 0) -> None:
        """Finish the layer with the given FFN output (dense, or the split layer's for compensation)."""
        mid = self._mid[stream]
        if mid is None:
            raise RuntimeError("call ffn_input() before advance()")
        self.hidden[stream] = mid + ffn_output.reshape(mid.shape).to(mid.dtype)
        self._mid[stream] = None
        self._x[stream] = None


class _Stream:
    """One stream of a LayerRunner behind the one-stream interface."""

    def __init__(self, runner: LayerRunner, index: int):
        self.runner, self.index = runner, index

    @property
    def layers(self) -> int:
        return self.runner.layers

    @property
    def hidden(self) -> torch.Tensor:
        return self.runner.hidden[self.index]

    def ffn_input(self, layer: int) -> torch.Tensor:
        return self.runner.ffn_input(layer, self.index)

    def residual(self) -> torch.Tensor:
        return self.runner.residual(self.index)

    def advance(self, ffn_output: torch.Tensor) -> None:
        self.runner.advance(ffn_output, self.index)


def ffn_activations(ffn: FFNWeights, x: torch.Tensor) -> torch.Tensor:
    """Per-neuron SwiGLU activations silu(gate x) * (up x), [tokens, neurons] (`FFNWeights.activations`)."""
    return ffn.activations(x)


@dataclass
class NeuronStats:
    """What calibration says about each FFN neuron of one layer.

    `contribution` is |activation| x |down column|: how much a neuron moves the output at a token.
    A neuron "fires" at a token when its contribution is among the top FIRE_FRACTION of the layer's.
    """

    tokens: int
    mean_abs: torch.Tensor  # [n] mean |activation|
    mean_contribution: torch.Tensor  # [n] mean |activation| * |down column|
    fire_rate: torch.Tensor  # [n] fraction of tokens at which the neuron fires
    coactivation: torch.Tensor  # [n, n] fraction of tokens at which both fire

    @classmethod
    def from_activations(cls, acts: torch.Tensor, down: torch.Tensor, fire_fraction: float = FIRE_FRACTION,
                         chunk: int = 4096) -> NeuronStats:
        n = acts.shape[1]
        col = down.norm(dim=0)
        top = max(1, round(fire_fraction * n))
        mean_abs = torch.zeros(n, dtype=torch.float64)
        mean_c = torch.zeros(n, dtype=torch.float64)
        fires = torch.zeros(n, dtype=torch.float64)
        co = torch.zeros(n, n, dtype=torch.float64)
        for start in range(0, acts.shape[0], chunk):
            a = acts[start:start + chunk].abs()
            c = a * col
            fired = torch.zeros_like(c)
            fired.scatter_(1, torch.topk(c, top, dim=1).indices, 1.0)
            mean_abs += a.sum(0, dtype=torch.float64)
            mean_c += c.sum(0, dtype=torch.float64)
            fires += fired.sum(0, dtype=torch.float64)
            co += (fired.T @ fired).double()
        t = acts.shape[0]
        return cls(t, (mean_abs / t).float(), (mean_c / t).float(), (fires / t).float(), (co / t).float())


def layer_stats(ffn: FFNWeights, x: torch.Tensor) -> NeuronStats:
    return NeuronStats.from_activations(ffn_activations(ffn, x), ffn.down)
