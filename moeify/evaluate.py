"""`moeify eval`: perplexity, activation ratio, expert load and per-layer reconstruction error of a model.

Models are loaded the way users will load them, with stock `AutoModelForCausalLM` from local files
(float32, or the checkpoint's own dtype when it is quantized: transformers dequantizes FP8). Text is
cut by `moeify.data.tokenize_chunks`, so every model is scored on identical tokens.

Expert load comes from hooks on each MoE block's router (`mlp.gate`, or `block_sparse_moe.gate` for Mixtral
before transformers 5: arch/names.py finds the block), which in transformers 5 returns
(logits, weights, indices) for Mixtral, Qwen2-MoE and Qwen3-MoE alike. Reconstruction error is
measured layer by layer: the baseline's FFN input at each layer is fed to the MoE block of the same
layer and compared to the baseline's FFN output, so each number is that layer's own error, not the
drift accumulated before it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeify.arch.names import ROUTER_ATTR, ffn_block
from moeify.device import resolve_device
from moeify.errors import InputError, UsageError
from moeify.progress import SILENT, Reporter


@dataclass
class EvalOptions:
    text: str | None = None  # file, folder or hf:DATASET; None = the shipped held-out novel excerpt
    seq_len: int = 512
    max_chunks: int | None = None
    plot: str | None = None  # PNG of expert load per layer and a perplexity bar chart (needs moeify[plot])
    device: str = "auto"  # where the forward passes run (moeify.device); float32 on every device
    baseline_cache: bool = True  # reuse the baseline's perplexity on the same tokens (user cache dir)


def default_eval_text() -> str:
    from moeify.data import packaged_text

    return str(packaged_text("eval_sense_and_sensibility.txt"))


def load_model(folder: Path):
    """Stock transformers, local files only; float32 unless the checkpoint is quantized."""
    from transformers import AutoModelForCausalLM

    from moeify.arch.consistency import check_checkpoint
    from moeify.io.reader import CheckpointReader, load_json

    config = load_json(folder / "config.json", "config.json")
    # headers, index and config.json checked, pickles refused, before transformers reads anything
    check_checkpoint(CheckpointReader(folder), config)
    dtype = "auto" if config.get("quantization_config") else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{folder}: transformers cannot load this model ({type(e).__name__}: {e})",
                         "is it a complete checkpoint folder? `moeify inspect` says what it is") from e
    return model.eval()


def _layers(model) -> list[torch.nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise InputError(f"{type(model).__name__} has no model.layers", "moeify evaluates decoder-only LMs")
    return list(layers)


def _ffn(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder layer's FFN module, dense or MoE, whatever transformers calls it."""
    found = ffn_block(layer)
    return found[1] if found else None


def _moe_gate(layer: torch.nn.Module) -> torch.nn.Module | None:
    block = _ffn(layer)
    gate = getattr(block, ROUTER_ATTR, None)
    return gate if gate is not None and hasattr(gate, "weight") and hasattr(block, "experts") else None


class _Loads:
    """Counts, per MoE layer, how many tokens each expert received."""

    def __init__(self, model):
        self.counts: dict[int, torch.Tensor] = {}
        self.paused = False  # set while the layer-error probe calls the MoE blocks outside the forward pass
        self.hooks = []
        for i, layer in enumerate(_layers(model)):
            gate = _moe_gate(layer)
            if gate is None:
                continue
            experts = gate.weight.shape[0]
            top_k = getattr(gate, "top_k", None) or model.config.num_experts_per_tok
            self.counts[i] = torch.zeros(experts, dtype=torch.long)
            self.hooks.append(gate.register_forward_hook(self._hook(i, experts, top_k)))

    def _hook(self, index: int, experts: int, top_k: int):
        def record(module, args, output):
            if self.paused:
                return
            if isinstance(output, tuple) and len(output) >= 3:
                chosen = output[2]
            else:
                logits = output[0] if isinstance(output, tuple) else output
                chosen = torch.topk(logits, top_k, dim=-1).indices
            self.counts[index] += torch.bincount(chosen.reshape(-1).long(), minlength=experts).cpu()

        return record

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def chunk_nll(model, chunk: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one chunk and the number of predicted tokens."""
    chunk = chunk.to(next(model.parameters()).device)
    logits = model(chunk[None]).logits[0, :-1].float()
    return F.cross_entropy(logits, chunk[1:], reduction="sum").item(), chunk.numel() - 1


class _LayerErrors:
    """Per-layer |moe_ffn(x) - dense_ffn(x)|^2 / |dense_ffn(x)|^2, x being the FFN input of the evaluated model.

    Both FFNs see the same input, so each number is that layer's own error, not drift accumulated before it.
    The input is the MoE's own (its forward pass is running anyway): only the baseline's FFNs run here, never
    its whole forward pass, so a baseline whose perplexity is cached costs no forward pass at all.
    """

    def __init__(self, baseline, model, loads: _Loads):
        self.loads = loads
        self.dense_layers = _layers(baseline)
        self.moe_layers = _layers(model)
        if len(self.dense_layers) != len(self.moe_layers):
            raise UsageError(f"the baseline has {len(self.dense_layers)} layers, the model {len(self.moe_layers)}",
                             "give the dense model this one was split from as --baseline")
        self.err = [0.0] * len(self.dense_layers)
        self.ref = [0.0] * len(self.dense_layers)
        self.hooks = [_ffn(layer).register_forward_hook(self._hook(i)) for i, layer in enumerate(self.moe_layers)
                      if _moe_gate(layer) is not None]
        self.dtype = next(baseline.parameters()).dtype

    def _hook(self, index: int):
        def record(module, args, output):
            got = (output[0] if isinstance(output, tuple) else output).float()
            want = _ffn(self.dense_layers[index])(args[0].to(self.dtype)).float()
            self.err[index] += (got - want).pow(2).sum().item()
            self.ref[index] += want.pow(2).sum().item()

        return record

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def result(self) -> list[float]:
        return [math.sqrt(e / r) if r > 0 else 0.0 for e, r in zip(self.err, self.ref, strict=True)]


BASELINE_CACHE_VERSION = 1


def baseline_cache_key(folder: Path, chunks: torch.Tensor) -> str:
    """The baseline's perplexity is a function of its weights and the exact token ids: key on both.

    Weights are identified by each weight file's name, size and modification time plus config.json's bytes
    (hashing gigabytes on every call would cost what the cache saves); the token ids carry the text, the
    tokenizer, --seq-len and --max-chunks.
    """
    import hashlib

    h = hashlib.sha256(f"moeify-baseline-nll-v{BASELINE_CACHE_VERSION}".encode())
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()
        h.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    h.update((folder / "config.json").read_bytes())
    h.update(str(chunks.shape).encode())
    h.update(chunks.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _baseline_cache_path(key: str) -> Path:
    from moeify.source import cache_dir

    return cache_dir() / "eval-baseline" / f"{key}.json"


def _read_baseline_cache(key: str) -> dict[str, Any] | None:
    import json

    path = _baseline_cache_path(key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("nll"), float) and isinstance(data.get("count"), int)
    return data if ok else None


def _write_baseline_cache(key: str, record: dict[str, Any]) -> None:
    import json
    import os

    path = _baseline_cache_path(key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # a reader never sees half a file
    except OSError:  # a read-only cache only costs the next call a recomputation
        tmp.unlink(missing_ok=True)


def activation_ratio(folder: Path, baseline: Path | None) -> float | None:
    """Active FFN parameters per token / the dense model's FFN parameters."""
    from moeify.describe import describe

    info = describe(folder)
    if info.get("kind") != "moe":
        return 1.0
    if baseline is not None:
        dense = describe(baseline)
        if dense.get("kind") == "dense" and dense.get("ffn_parameters"):
            return info["active_ffn_parameters"] / dense["ffn_parameters"]
    return info.get("activation_ratio_vs_dense") or info.get("activation_ratio")


def evaluate_model(model: str | Path, options: EvalOptions | None = None, baseline: str | Path | None = None,
                   reporter: Reporter = SILENT) -> dict[str, Any]:
    """Score `model` (and `baseline`) on the same chunks; returns everything `moeify eval` prints."""
    from moeify.arch.consistency import check_folder
    from moeify.data import load_text, load_tokenizer, tokenize_chunks
    from moeify.source import resolve_source

    options = options or EvalOptions()
    if options.plot:
        _require_matplotlib()
    if options.max_chunks is not None and options.max_chunks < 1:
        raise UsageError("--max-chunks must be at least 1", "e.g. --max-chunks 8")
    # Perplexities are compared across machines and cached, so the GPU runs the same float32 arithmetic.
    device = resolve_device(options.device)  # an absent GPU fails here, before anything is read
    started = time.perf_counter()
    folder = resolve_source(model, reporter=reporter).folder
    base_folder = resolve_source(baseline, reporter=reporter).folder if baseline is not None else None
    for checked in (folder, base_folder):  # config.json against the tensors, before the tokenizer reads it
        if checked is not None:
            check_folder(checked)
    text_spec = options.text or default_eval_text()
    chunks = tokenize_chunks(load_tokenizer(folder), load_text(text_spec), options.seq_len,
                             max_chunks=options.max_chunks)
    reporter.status(f"loading {folder}")
    net = load_model(folder).to(device)
    loads = _Loads(net)
    cache_key = cached = None
    if base_folder is not None:
        cache_key = baseline_cache_key(base_folder, chunks)
        cached = _read_baseline_cache(cache_key) if options.baseline_cache else None
        if cached is not None:
            reporter.note(f"baseline perplexity of {base_folder.name} from the cache (same weights and tokens, "
                          f"computed {cached.get('created', 'earlier')}); --recompute-baseline scores it again")
    # the baseline model is needed for its perplexity (unless cached) and for the layer errors (an MoE only)
    need_base = base_folder is not None and (cached is None or bool(loads.counts))
    base = load_model(base_folder).to(device) if need_base else None
    errors = _LayerErrors(base, net, loads) if base is not None and loads.counts else None
    nll = base_nll = 0.0
    count = 0
    try:
        with torch.no_grad():
            for chunk in reporter.track(chunks, "Evaluating", total=len(chunks)):
                value, n = chunk_nll(net, chunk)
                nll += value
                count += n
                if base is not None and cached is None:
                    base_nll += chunk_nll(base, chunk)[0]
    finally:
        loads.remove()
        if errors is not None:
            errors.remove()
    if cache_key is not None and cached is None:
        _write_baseline_cache(cache_key, {"nll": base_nll, "count": count, "baseline": str(base_folder),
                                          "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    base_count = count
    if cached is not None:
        base_nll, base_count = cached["nll"], cached["count"]
    result: dict[str, Any] = {
        "model": str(folder), "text": str(text_spec), "tokens": int(chunks.numel()), "chunks": int(chunks.shape[0]),
        "seq_len": options.seq_len, "perplexity": math.exp(nll / count),
        "activation_ratio": activation_ratio(folder, base_folder),
    }
    if base_folder is not None:
        result["baseline"] = str(base_folder)
        result["baseline_perplexity"] = math.exp(base_nll / base_count)
        result["perplexity_ratio"] = result["perplexity"] / result["baseline_perplexity"]
        result["baseline_cached"] = cached is not None
    if loads.counts:
        result["expert_load"] = {str(i): c.tolist() for i, c in loads.counts.items()}
        result["load_imbalance"] = {str(i): float(c.max() * len(c) / c.sum().clamp_min(1))
                                    for i, c in loads.counts.items()}
    if errors is not None:
        result["layer_reconstruction_error"] = [float(f"{e:.4g}") for e in errors.result()]
    result["seconds"] = round(time.perf_counter() - started, 2)
    if options.plot:
        result["plot"] = str(plot(result, options.plot))
    return result


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """PNG: expert load per layer and expert (heat map) beside a perplexity bar chart."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    loads = result.get("expert_load") or {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    ax = axes[0]
    if loads:
        layers = sorted(loads, key=int)
        grid = torch.tensor([loads[i] for i in layers], dtype=torch.float32)
        share = grid / grid.sum(1, keepdim=True).clamp_min(1)
        image = ax.imshow(share.T.numpy(), aspect="auto", cmap="viridis", origin="lower")
        ax.set_xlabel("layer")
        ax.set_ylabel("expert")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, fontsize=6)
        fig.colorbar(image, ax=ax, label="share of routed tokens")
        ax.set_title("expert load per layer")
    else:
        ax.text(0.5, 0.5, "dense model: no experts", ha="center", va="center")
        ax.set_axis_off()
    ax = axes[1]
    names, values = ["model"], [result["perplexity"]]
    if "baseline_perplexity" in result:
        names.insert(0, "baseline")
        values.insert(0, result["baseline_perplexity"])
    bars = ax.bar(names, values, color=["#999999", "#3b75af"][-len(values):])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_title("perplexity")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise InputError(f"{path}: cannot write the plot ({e.strerror})", "choose a writable path") from e
    finally:
        plt.close(fig)
    return path


def _require_matplotlib() -> None:
    """Fail before the long work, not after it, when the optional plotting extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise UsageError("--plot needs matplotlib, which is not installed", "pip install 'moeify[plot]'") from e
