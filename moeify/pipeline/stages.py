"""The one table of the stages a recipe can run: each one's options, its run function and its result.

A recipe section takes exactly the options of the stage's library entry point: the fields of an options
dataclass (`SplitOptions`) or the keyword parameters of the stage function (`quantize_fp8`). The recipe
schema (pipeline/recipe.py), its validation (pipeline/checks.py) and the runner (pipeline/runner.py) all
read `STAGES`; none keeps a second list. Each stage's `run` calls the library entry point and returns
that stage's typed result, whose fields are the columns `moeify run` reports. The stage modules are
imported only when needed, one by one: a stage that is not installed turns into a clear error for
recipes that use it and does not break the others.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from moeify.errors import UsageError

if TYPE_CHECKING:
    from moeify.pipeline.runner import RunContext, Step

MISSING = dataclasses.MISSING
Scalar = int | float | str | bool | None


@dataclass(frozen=True)
class StageResult:
    """What a stage that ran reports in the run summary: flat scalars, one per field."""

    def summary(self) -> dict[str, Scalar]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SplitResult(StageResult):
    activation_ratio: float | None
    expert_size: int | None
    architecture: str | None


@dataclass(frozen=True)
class ScalarsResult(StageResult):
    """The scalar entries of a stage's record (finetune's and eval's records vary with their options)."""

    values: dict[str, Scalar]

    @classmethod
    def of(cls, record: dict[str, Any], kinds: tuple[type, ...]) -> ScalarsResult:
        return cls({k: v for k, v in record.items() if isinstance(v, kinds)})

    def summary(self) -> dict[str, Scalar]:
        return dict(self.values)


@dataclass(frozen=True)
class QuantizeResult(StageResult):
    scheme: str
    output_bytes: int


@dataclass(frozen=True)
class PushResult(StageResult):
    url: str


@dataclass(frozen=True)
class OptionField:
    """One option of a stage: its type, default (MISSING when required) and allowed values."""

    name: str
    annotation: Any
    default: Any = MISSING
    default_factory: Callable[[], Any] | None = None


@dataclass(frozen=True)
class StageDef:
    """A pipeline stage: where its options come from and which parameters the pipeline fills in itself."""

    name: str
    command: str  # the CLI command taking the same options (for docs and error hints)
    module: str
    sources: tuple[str, ...]  # attributes of `module`: an options dataclass, or functions with keyword args
    supplied: frozenset[str] = frozenset()  # parameters the pipeline passes (input, output, reporter...)
    produces_model: bool = True
    choices: Callable[[], dict[str, tuple[Any, ...]]] | None = None
    excluded: frozenset[str] = field(default_factory=frozenset)
    run: Callable[[Step, RunContext], StageResult] | None = None  # the pipeline's call of the stage
    # The value checks the stage's command makes before any work, run by recipe validation on the
    # section's options (split's need the model, so checks.py runs them with the model's config).
    validate: Callable[[dict[str, Any]], None] | None = None

    def fields(self) -> list[OptionField]:
        """The stage's options, read from its module (ImportError when the stage is not available)."""
        module = importlib.import_module(self.module)
        found: dict[str, OptionField] = {}
        for attr in self.sources:
            obj = getattr(module, attr)
            for f in _fields_of(obj):
                if f.name in self.supplied or f.name in self.excluded or f.name in found:
                    continue
                found[f.name] = f
        allowed = self.choices() if self.choices else {}
        return [dataclasses.replace(f, annotation=_restrict(f.annotation, allowed[f.name]))
                if f.name in allowed else f for f in found.values()]


def _fields_of(obj: Any) -> list[OptionField]:
    if dataclasses.is_dataclass(obj):
        hints = typing.get_type_hints(obj)
        out = []
        for f in dataclasses.fields(obj):
            factory = f.default_factory if f.default_factory is not MISSING else None
            out.append(OptionField(f.name, hints[f.name], f.default, factory))
        return out
    hints = typing.get_type_hints(obj)
    out = []
    for p in inspect.signature(obj).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = MISSING if p.default is inspect.Parameter.empty else p.default
        out.append(OptionField(p.name, hints.get(p.name, Any), default))
    return out


def _restrict(annotation: Any, values: tuple[Any, ...]) -> Any:
    """`str` with known values becomes a Literal, so a typo fails at load and the error lists the choices."""
    literal = Literal[values]  # type: ignore[valid-type]
    args = typing.get_args(annotation)
    if type(None) in args:
        return literal | None
    return literal


def _split_choices() -> dict[str, tuple[Any, ...]]:
    from moeify.arch import TARGETS
    from moeify.split.convert import DTYPES
    from moeify.split.methods import METHODS

    return {"method": tuple(METHODS), "target": tuple(TARGETS), "dtype": tuple(DTYPES)}


def _finetune_choices() -> dict[str, tuple[Any, ...]]:
    from moeify.finetune.run import DEVICES, STAGES

    return {"stage": STAGES, "device": DEVICES}


def _quantize_choices() -> dict[str, tuple[Any, ...]]:
    from moeify.quant.fp8 import SCHEMES

    return {"scheme": ("auto", *SCHEMES)}


def _import_stage(stage: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"the {stage} stage is not available in this moeify ({e})",
                         f"remove `{stage}:` from the recipe") from e


def _validate_split(options: dict[str, Any]) -> None:
    """The split checks that need no model (the rest run against its config in checks.py): `dense_layers`
    is a list of indices, `auto` or `auto:N` (the recipe type admits any string)."""
    from moeify.split.dense_auto import parse_dense_layers

    parse_dense_layers(options.get("dense_layers"))


def _validate_finetune(options: dict[str, Any]) -> None:
    from moeify.finetune.run import FinetuneOptions, validate_options

    validate_options(FinetuneOptions(**options))


def _run_split(step: Step, ctx: RunContext) -> SplitResult:
    split = _import_stage("split", "moeify.split.convert")
    result = split.split_model(ctx.recipe.model, step.output, split.SplitOptions(**step.options),
                               overwrite=step.state == "stale", reporter=ctx.reporter,
                               revision=ctx.recipe.revision, token=ctx.token)
    return SplitResult(result.get("activation_ratio"), result.get("expert_size"), result.get("architecture"))


def _run_finetune(step: Step, ctx: RunContext) -> ScalarsResult:
    finetune = _import_stage("finetune", "moeify.finetune")
    options = finetune.FinetuneOptions(**step.options)
    record = finetune.finetune(step.input, step.output, options, overwrite=step.state == "stale",
                               reporter=ctx.reporter)
    return ScalarsResult({k: v for k, v in record.items() if not isinstance(v, dict | list)})


def _run_quantize(step: Step, ctx: RunContext) -> QuantizeResult:
    quantize = _import_stage("quantize", "moeify.quant.quantize")
    result = quantize.quantize_fp8(step.input, step.output, **step.options, overwrite=step.state == "stale",
                                   reporter=ctx.reporter)
    summary = result.summary()
    return QuantizeResult(summary["scheme"], summary["output_bytes"])


def _run_eval(step: Step, ctx: RunContext) -> ScalarsResult:
    from moeify.io.output import atomic_output
    from moeify.metadata import read_metadata, write_metadata

    evaluate = _import_stage("eval", "moeify.evaluate")
    model = Path(step.input)
    baseline = ctx.source_folder()
    options = evaluate.EvalOptions(**step.options)
    record = evaluate.evaluate_model(model, options, baseline=baseline, reporter=ctx.reporter)
    with atomic_output(step.output, overwrite=step.state == "stale") as tmp:
        (tmp / "eval.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        write_metadata(tmp, "eval", {"model": str(model), "baseline": str(baseline), **record})
    # The evaluated model carries its numbers too, so the model card (built from its moeify.json) shows them.
    write_metadata(model, "eval", record, read_metadata(model))
    return ScalarsResult.of(record, (int, float, str))


def _run_push(step: Step, ctx: RunContext) -> PushResult:
    from moeify.io.output import atomic_output
    from moeify.metadata import write_metadata

    hub = _import_stage("push", "moeify.publish.hub")
    opts = dict(step.options)
    folder = ctx.last_model(step)
    if folder is None:
        raise UsageError("push needs a model stage before it", "add a split stage")
    plan_args = {k: opts.pop(k) for k in list(opts) if k in ("repo_id", "overwrite_card")}
    plan = hub.plan_push(folder, reporter=ctx.reporter, **plan_args)
    result = hub.push(plan, ctx.token, reporter=ctx.reporter, **opts)
    record = {"folder": str(folder), "repo_id": plan.repo_id, "url": result.url,
              "commit_url": result.commit_url, "pr_url": result.pr_url,
              "uploaded_files": result.uploaded_files, "total_bytes": result.total_bytes}
    with atomic_output(step.output, overwrite=step.state == "stale") as tmp:
        write_metadata(tmp, "push", record)
    return PushResult(result.url)


STAGES: dict[str, StageDef] = {s.name: s for s in (
    StageDef("split", "moeify split", "moeify.split.convert", ("SplitOptions",), choices=_split_choices,
             run=_run_split, validate=_validate_split),
    StageDef("finetune", "moeify finetune", "moeify.finetune", ("FinetuneOptions",), choices=_finetune_choices,
             run=_run_finetune, validate=_validate_finetune),
    StageDef("quantize", "moeify quantize --fp8", "moeify.quant.quantize", ("quantize_fp8",),
             supplied=frozenset({"input_dir", "output", "overwrite", "reporter"}), choices=_quantize_choices,
             run=_run_quantize),
    StageDef("eval", "moeify eval", "moeify.evaluate", ("EvalOptions",), produces_model=False,
             supplied=frozenset({"model", "baseline", "reporter", "output"}), run=_run_eval),
    StageDef("push", "moeify push", "moeify.publish.hub", ("plan_push", "push"), produces_model=False,
             supplied=frozenset({"folder", "plan", "token", "reporter", "progress", "retries", "backoff"}),
             run=_run_push),
)}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)
MODEL_STAGES = tuple(name for name, s in STAGES.items() if s.produces_model)
