"""Check a recipe against its model without touching weights, and estimate what a run will produce.

`validate` and `run --dry-run` share this: the split plan is built from config.json and the safetensors
headers (`plan_split`), which already refuses impossible expert counts, unknown targets and dense-layer
indices outside the model. On top of that, a block-FP8 quantize stage is checked against the planned
shapes (every quantized dimension must be a multiple of 128), and sizes are estimated per stage: the
split from the planned tensors, FP8 as one byte per quantized weight plus its float32 scales.

When the model is not on this machine (a Hub id not yet downloaded, a GGUF not yet converted) only its
config.json is consulted if it can be fetched, and the checks that need shapes are skipped with a note.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeify.errors import InputError, MoeifyError, UsageError
from moeify.pipeline.recipe import Recipe
from moeify.pipeline.runner import Step, plan_run
from moeify.pipeline.stages import STAGES
from moeify.progress import SILENT, Reporter


@dataclass
class CheckResult:
    checked_against: str  # "weights headers", "config.json only" or "nothing (model not available)"
    steps: list[Step]
    notes: list[str] = field(default_factory=list)
    activation_ratio: float | None = None
    source_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"checked_against": self.checked_against, "activation_ratio": self.activation_ratio,
                "source_bytes": self.source_bytes, "notes": self.notes,
                "steps": [s.describe() for s in self.steps]}


def check_recipe(recipe: Recipe, reporter: Reporter = SILENT, fetch_config: bool = True) -> CheckResult:
    """Validate the recipe's options against the model and fill each step's size estimate."""
    steps = plan_run(recipe)
    from moeify.split.convert import SplitOptions

    options = SplitOptions(**recipe.options("split"))
    folder = _local_model_folder(recipe.model)
    result = CheckResult("nothing (model not available)", steps)
    try:
        _check_stage_options(recipe)
        if folder is not None:
            _check_with_headers(recipe, folder, options, result)
        else:
            config, why = _fetch_config(recipe, reporter) if fetch_config else (None, "")
            if config is None:
                result.notes.append(f"{recipe.model} is not on this machine{why}: only the recipe itself was "
                                    "checked (pass model=PATH to check it against a local copy; `moeify demo "
                                    "--model-path` prints the demo's cached SmolLM2-135M)")
            else:
                _check_with_config(config, options, result)
    except MoeifyError as e:
        message = f"{_stage_of(e)}{e.message}"
        raise type(e)(f"{recipe.origin}: {_as_recipe_fields(message)}", _recipe_hint(message, e.hint)) from None
    return result


def _stage_of(e: MoeifyError) -> str:
    return "" if str(e.message).startswith(tuple(STAGES)) else "split: "


_FLAG = re.compile(r"--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
_FLAG_VALUE = re.compile(r"--([a-z][a-z0-9]*(?:-[a-z0-9]+)*) (?!or\b|and\b)([^\s,;)]+)")


def _as_recipe_fields(message: str, stage: str | None = None, values: bool = False) -> str:
    """The stages' checks name CLI flags (`--top-k`); in a recipe the user wrote fields: say `split.top_k`
    (and, in a hint's example, `split.top_k=2` for `--top-k 2`)."""
    stage = stage or message.split(":", 1)[0]
    text = message
    if values:
        text = _FLAG_VALUE.sub(lambda m: f"{stage}.{m.group(1).replace('-', '_')}={m.group(2)}", text)
    return _FLAG.sub(lambda m: f"{stage}.{m.group(1).replace('-', '_')}", text)


def _recipe_hint(message: str, hint: str | None) -> str | None:
    """The hint in recipe terms, naming the command-line flags it came from for whoever knows those."""
    if not hint or not _FLAG.search(hint):
        return hint
    flags = ", ".join(dict.fromkeys(m.group(0) for m in _FLAG.finditer(hint)))
    return f"{_as_recipe_fields(hint, message.split(':', 1)[0], values=True)} (on the command line: {flags})"


def _check_stage_options(recipe: Recipe) -> None:
    """Each section's values (finetune's stage, budget, device...), checked now rather than after the
    stages before it have run: the checks the stage table says its command makes before it starts."""
    for name in recipe.stages():
        validate = STAGES[name].validate
        if validate is None:
            continue
        try:
            validate(recipe.options(name))
        except UsageError as e:
            raise UsageError(f"{name}: {e.message}", e.hint) from None


def _local_model_folder(model: str) -> Path | None:
    """A folder whose headers can be read now: a local checkpoint, or a GGUF already converted and cached."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.suffix == ".gguf" and path.is_file():
        from moeify.source import cache_dir

        stem = path.stem
        for cached in sorted((cache_dir() / "gguf").glob(f"{stem}-*")):
            if (cached / "config.json").is_file() and any(cached.glob("*.safetensors")):
                return cached
    return None


def _fetch_config(recipe: Recipe, reporter: Reporter) -> tuple[dict[str, Any] | None, str]:
    """The model's config.json from the Hub (or its cache), else None and why, in one attempt (no retries)."""
    path = Path(recipe.model).expanduser()
    if path.suffix == ".gguf" or path.exists():
        return None, ""
    from moeify.source import fetch_config

    try:
        reporter.status(f"reading config.json of {recipe.model} (no weights)")
        return fetch_config(recipe.model, recipe.revision), ""
    except MoeifyError as e:  # offline, gated or missing: validation then covers the recipe only
        reason = "the Hub cannot be reached" if "cannot be reached" in e.message else "its config.json is unreadable"
        return None, f" and {reason}"
    except Exception:  # noqa: BLE001 - anything else the Hub client raises: same answer
        return None, " and its config.json could not be read"


def _check_with_headers(recipe: Recipe, folder: Path, options, result: CheckResult) -> None:
    from moeify.source import Source
    from moeify.split.convert import plan_split

    source = Source(folder, "local", str(folder))
    plan = plan_split(folder, options, source=source)
    result.checked_against = f"{folder} (config.json and safetensors headers; no weights read)"
    result.activation_ratio = round(plan.activation_ratio, 6)
    from moeify.io.reader import CheckpointReader

    result.source_bytes = CheckpointReader(folder).total_bytes()
    tp = plan.target_plan
    split_bytes = sum(s.nbytes for s in plan.specs)
    shapes = {s.name: tuple(s.shape) for s in plan.specs}
    current = split_bytes
    for step in result.steps:
        if step.stage == "split":
            step.estimate = {"architecture": plan.target.architecture, "expert_size": tp.expert_size,
                             "padding_neurons_per_layer": plan.padding,
                             "activation_ratio": result.activation_ratio, "expected_bytes": split_bytes}
        elif step.stage == "finetune":
            step.estimate = {"expected_bytes": current}
        elif step.stage == "quantize":
            est = _fp8_estimate(plan.specs, shapes, step.options)
            current = est["expected_bytes"]
            step.estimate = est


def _fp8_estimate(specs, shapes: dict[str, tuple[int, ...]], options: dict[str, Any]) -> dict[str, Any]:
    from moeify.quant.fp8 import scale_shape
    from moeify.quant.plan import choose_scheme, classify

    experts_only = bool(options.get("experts_only", False))
    targets = {n: s for n, s in shapes.items() if len(s) == 2 and math.prod(s) and classify(n, experts_only)}
    try:
        scheme, why = choose_scheme(targets, options.get("scheme", "auto"))
    except UsageError as e:
        raise UsageError(f"quantize.scheme: {e.message}",
                         "use scheme auto or channel, or split with pad_to: 128") from None
    total = 0
    for spec in specs:
        if spec.name in targets:
            total += math.prod(spec.shape) + 4 * math.prod(scale_shape(scheme, spec.shape))
        else:
            total += spec.nbytes
    return {"scheme": scheme, "scheme_reason": why, "expected_bytes": total}


def _check_with_config(config: dict[str, Any], options, result: CheckResult) -> None:
    """Only config.json is known: the split's option checks and the activation ratio, no sizes."""
    from moeify.split.convert import activation_ratio, plan_target

    target, tp = plan_target(config, options)
    size = tp.expert_size
    ratio = activation_ratio(tp, config["num_hidden_layers"], config["intermediate_size"])
    result.checked_against = "config.json only (weights not on this machine)"
    result.activation_ratio = round(ratio, 6)
    for step in result.steps:
        if step.stage == "split":
            step.estimate = {"architecture": target.architecture, "expert_size": size,
                             "activation_ratio": result.activation_ratio}
        if step.stage == "quantize" and step.options.get("scheme") == "block":
            odd = [d for d in (size, config["hidden_size"]) if d % 128]
            if odd:
                raise UsageError(f"quantize.scheme: block needs dimensions that are multiples of 128, but "
                                 f"{odd[0]} is not", "split with pad_to: 128, or use scheme: channel")


def check_model_config(recipe: Recipe, config: dict[str, Any]) -> CheckResult:
    """Check a recipe against a given config (tests use the real models' published configs)."""
    from moeify.split.convert import SplitOptions

    result = CheckResult("config.json only", plan_run(recipe))
    try:
        _check_with_config(config, SplitOptions(**recipe.options("split")), result)
    except MoeifyError as e:
        raise type(e)(f"{recipe.origin}: {_stage_of(e)}{e.message}", e.hint) from None
    return result


__all__ = ["CheckResult", "check_recipe", "check_model_config", "InputError"]
