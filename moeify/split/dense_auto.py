"""`--dense-layers auto`: keep the layers that split worst dense, and give the rest the activation left over.

Which layers suffer most from being split is a property of the model, not of its name, so it is measured:
a cheap screening pass runs the configured data-driven method over every layer as the split would (same
layout, calibration text, ridges and seed) but with at most `SCREEN_TOKENS` calibration tokens, no refinement
and each layer on the dense model's inputs (`SCREEN_STREAM`), writes nothing, and keeps the per-layer relative
output error the method already records in moeify.json (`error_after_repair`; the same number, not a second
metric). The layers with the highest screened error are kept dense.

The activation budget is for the whole model: with D of L layers dense (each runs its full FFN), the MoE
layers must run at r' = (L*r - D) / (L - D) for the model to stay at the requested ratio r, so the layout is
re-resolved for r'. A layout fixed by the user (`--top-k` with `--shared`, or `--top-k` without `--active`)
is kept as given, and the dense layers then raise the total: the split says so.

`auto:N` forces N dense layers (the N highest screened errors), for measuring which N is best; `auto` lets
`dense_count_rule` choose. Memory stays bounded by one layer, as in the split itself.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from moeify.errors import UsageError
from moeify.progress import Reporter

if TYPE_CHECKING:
    from moeify.device import Compute
    from moeify.split.convert import SplitOptions, SplitPlan

T = TypeVar("T")

SCREEN_TOKENS = 4096  # calibration tokens of the screening pass (fewer when the split itself uses fewer)
# Each layer screened on the dense model's own inputs, fitted in isolation: its error is then its own. On the
# split stream ("compensate", the split's default) a layer that splits badly passes its error on, and the
# layers after it, asked to undo it, score high instead (a tiny model with one hard layer chose the two
# after it). One stream is also half the calibration cost of "compensate".
SCREEN_STREAM = "dense"
ERROR_THRESHOLD = 1.5  # `auto` keeps dense the layers whose screened error exceeds this x the median
MAX_DENSE_SHARE = 0.25  # ... at most this share of the layers
_AUTO = re.compile(r"^auto(?::(\d+))?$")
# Per-layer errors the activations method records, most refined first; the screen runs with no refinement.
ERROR_KEYS = ("error_after_refine", "error_after_repair", "error_before_repair")


@dataclass(frozen=True)
class DenseRequest:
    """`auto` (count None: the rule decides) or `auto:N` (exactly N layers)."""

    count: int | None = None

    def __str__(self) -> str:
        return "auto" if self.count is None else f"auto:{self.count}"


def parse_dense_layers(value: Any) -> list[int] | DenseRequest:
    """What `--dense-layers` / a recipe's `dense_layers` asks for: layer indices, or an automatic choice.

    Accepts a list of integers, `"auto"` or `"auto:N"`; anything else is a UsageError naming the forms.
    """
    if value is None:
        return []
    if isinstance(value, str):
        match = _AUTO.match(value.strip())
        if match is None:
            raise UsageError(f"--dense-layers {value!r} is not a list of layer indices, auto or auto:N",
                             "e.g. --dense-layers 0,1 or --dense-layers auto")
        return DenseRequest(None if match.group(1) is None else int(match.group(1)))
    if isinstance(value, list | tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return sorted(set(value))
    raise UsageError(f"--dense-layers {value!r} is not a list of layer indices, auto or auto:N",
                     "e.g. --dense-layers 0,1 or --dense-layers auto")


def dense_request(value: Any) -> DenseRequest | None:
    """The automatic request in `value`, or None when it lists the layers itself."""
    parsed = parse_dense_layers(value)
    return parsed if isinstance(parsed, DenseRequest) else None


def moe_ratio(ratio: float, layers: int, dense: int) -> float:
    """The active ratio r' the MoE layers need so that `dense` full layers of `layers` keep the model at `ratio`."""
    return (layers * ratio - dense) / (layers - dense)


def max_dense(layers: int, ratio: float | None) -> int:
    """The most dense layers `auto` keeps: a quarter of the layers, and few enough that r' >= r / 2.

    r' >= r/2 <=> D <= L*r / (2 - r). `ratio` None (a layout fixed by the user) has only the first cap.
    """
    cap = math.floor(layers * MAX_DENSE_SHARE)
    if ratio is not None and ratio < 1:
        cap = min(cap, math.floor(layers * ratio / (2 - ratio) + 1e-9))
    return max(0, cap)


def dense_count_rule(errors: Sequence[float], ratio: float | None) -> int:
    """How many layers `--dense-layers auto` keeps dense, from the screened per-layer errors.

    A first rule, to be replaced by measurement (bench/heldout.py with `dense_layers=auto:N`, N = 0, 2, 4,
    6): every layer whose screened error exceeds ERROR_THRESHOLD x the median error counts, capped by
    `max_dense` (at most a quarter of the layers, and the MoE layers at no less than half the requested
    ratio). A model whose layers split about equally well keeps none dense.
    """
    if not errors:
        return 0
    median = statistics.median(errors)
    above = sum(1 for e in errors if e > ERROR_THRESHOLD * median)
    return min(above, max_dense(len(errors), ratio))


def rule_text(request: DenseRequest, layers: int, ratio: float | None) -> str:
    """The rule that chose, in words, for the user and for moeify.json."""
    if request.count is not None:
        return f"auto:{request.count}: the {request.count} highest screened errors"
    return (f"screened error above {ERROR_THRESHOLD}x the median, at most {max_dense(layers, ratio)} layers "
            f"(a quarter of the layers{', and MoE layers at >= half the requested ratio' if ratio else ''})")


def highest(errors: Sequence[float], count: int) -> list[int]:
    """The `count` layers with the highest error (the earlier layer on a tie), in layer order."""
    order = sorted(range(len(errors)), key=lambda i: (-errors[i], i))
    return sorted(order[:count])


def check_request(request: DenseRequest, layers: int, ratio: float | None) -> None:
    """Refuse an `auto:N` that cannot be met; `ratio` None means the user fixed the MoE layout (no budget)."""
    n = request.count
    if n is None:
        return
    if n >= layers:
        raise UsageError(f"--dense-layers auto:{n} keeps every layer dense (the model has {layers})",
                         f"at most auto:{layers - 1}; fewer to stay near the activation budget")
    if ratio is not None and n > 0 and moe_ratio(ratio, layers, n) <= 0:
        most = max(0, math.ceil(layers * ratio) - 1)
        raise UsageError(f"--dense-layers auto:{n}: {n} dense layers of {layers} use more than the {ratio:.0%} "
                         "activation budget on their own", f"ask at most auto:{most}, or a larger --active")


def require_dense_target(target) -> None:
    """`auto` needs a target that can hold dense layers (Qwen2-MoE, Qwen3-MoE); Mixtral cannot."""
    if not target.supports_dense_layers:
        raise UsageError(f"--dense-layers auto needs a target that keeps layers dense, and {target.name} "
                         f"({target.architecture}) cannot",
                         "use shared experts with --shared 1 (the qwen2_moe target) or --target qwen2_moe, "
                         "or drop --dense-layers")


def require_screenable(method: str) -> None:
    """`auto` ranks layers by the error a data-driven method measures; `--method weights` measures none."""
    from moeify.split.methods import make_method

    if not make_method(method).needs_calibration:
        raise UsageError(f"--dense-layers auto ranks layers by their calibration error, which --method {method} "
                         "does not measure", "use --method activations, or list the layers")


@dataclass
class DenseChoice:
    """What `auto` chose and from what: recorded in moeify.json under `dense_layers_auto`."""

    request: DenseRequest
    errors: list[float]  # screened per-layer relative output error, in layer order
    layers: list[int]  # the ones kept dense
    rule: str
    ratio: float | None  # the requested whole-model ratio (None: layout fixed by the user)
    screen_tokens: int
    method: str
    seconds: float = 0.0  # the screening pass's wall time

    @property
    def median(self) -> float:
        return statistics.median(self.errors) if self.errors else 0.0

    @property
    def moe_ratio(self) -> float | None:
        if self.ratio is None:
            return None
        return moe_ratio(self.ratio, len(self.errors), len(self.layers))

    def record(self) -> dict[str, Any]:
        return {"request": str(self.request), "rule": self.rule, "chosen": self.layers,
                "screened_errors": self.errors, "median_error": round(self.median, 5),
                "error_key": "error_after_repair",
                "screening": {"method": self.method, "calibration_tokens": self.screen_tokens, "refine_steps": 0,
                              "stream": SCREEN_STREAM},
                "requested_active": self.ratio, "screen_s": round(self.seconds, 3),
                "moe_active": None if self.moe_ratio is None else round(self.moe_ratio, 6)}

    def summary(self) -> str:
        """The first half of the line the split prints: which layers, their errors against the median."""
        if not self.layers:
            lo, hi = min(self.errors, default=0.0), max(self.errors, default=0.0)
            why = "auto:0" if self.request.count == 0 else f"none above {ERROR_THRESHOLD}x the median"
            return (f"--dense-layers {self.request}: no layer kept dense (screened errors {lo:.3f}-{hi:.3f}, "
                    f"median {self.median:.3f}; {why})")
        errs = ", ".join(f"{self.errors[i]:.3f}" for i in self.layers)
        return (f"--dense-layers {self.request}: kept layer{'s' if len(self.layers) > 1 else ''} "
                f"{', '.join(map(str, self.layers))} dense (screened error {errs} vs median {self.median:.3f})")


def choose(errors: list[float], request: DenseRequest, ratio: float | None, screen_tokens: int, method: str
           ) -> DenseChoice:
    """The dense layers for `request` given the screened errors."""
    count = request.count if request.count is not None else dense_count_rule(errors, ratio)
    return DenseChoice(request, errors, highest(errors, count), rule_text(request, len(errors), ratio), ratio,
                       screen_tokens, method)


def layer_error(info: dict[str, Any]) -> float:
    """The final relative output error of one split layer as the method recorded it (0 when nothing is routed
    away: every expert runs and the split is exact)."""
    return float(next((info[k] for k in ERROR_KEYS if k in info), 0.0))


def screen_layers(plan: SplitPlan, options: SplitOptions, reporter: Reporter, compute: Compute) -> tuple[
        list[float], int]:
    """Split every layer of `plan` with cheap settings and return each layer's error (and the tokens used).

    Nothing is written; each layer's experts are dropped as soon as its error is read, so memory holds one
    layer, as in the split. The torch RNG is forked so the real split that follows is unchanged by this pass.
    """
    from moeify.arch import source_family
    from moeify.data import TOKENIZER_FILES
    from moeify.io.reader import CheckpointReader
    from moeify.split.convert import method_settings
    from moeify.split.methods import SplitContext, make_method
    from moeify.split.moe_layer import FFNWeights

    method = make_method(options.method)
    folder = Path(plan.source.folder)
    require_screenable(options.method)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError("--dense-layers auto ranks layers by their calibration error, and the model folder has "
                         "no tokenizer to calibrate with", "copy the tokenizer files in, or list the layers")
    tokens = min(SCREEN_TOKENS, options.calibration_tokens)
    settings = {**method_settings(options), "refine_steps": 0, "stream": SCREEN_STREAM}
    tplan = plan.target_plan
    family = source_family(plan.config)
    reader = CheckpointReader(folder)
    ctx = SplitContext(folder, reader, plan.config, family, plan.target, tplan.experts, tplan.top_k,
                       tplan.shared, tplan.expert_size, options.seed, _Muted(reporter), options.calibration, tokens, (),
                       settings, compute)
    errors: list[float] = []
    reporter.status(f"screening {plan.layers} layers for --dense-layers auto ({tokens} calibration tokens, "
                    "no refinement)")
    with torch.random.fork_rng(devices=[]):
        method.prepare(ctx)
        for i in reporter.track(range(plan.layers), "Screening layers", total=plan.layers):
            ffn = family.load_ffn(reader, i, torch.float32)
            with compute.autocast():
                moe = method.build(i, FFNWeights(*(compute.put(t, torch.float32) for t in (ffn.gate, ffn.up,
                                                                                         ffn.down))))
            del ffn
            errors.append(round(layer_error(moe.info), 5))
            del moe
            compute.release()
    calibrated = int(getattr(method, "calibrated_tokens", tokens))
    del method
    return errors, calibrated


class _Muted(Reporter):
    """The screening pass's reporter: progress and status go through, the method's notes (which would repeat
    those of the real split) do not."""

    def __init__(self, inner: Reporter):
        self.inner = inner

    def track(self, items: Iterable[T], description: str, total: int | None = None,
              postfix: Callable[[], str] | None = None) -> Iterator[T]:
        return self.inner.track(items, description, total, postfix)

    def status(self, message: str) -> None:
        self.inner.status(message)
