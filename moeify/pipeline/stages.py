"""The stages a recipe can run, and where each stage's options are defined.

A recipe section takes exactly the options of the stage's library entry point: the fields of an options
dataclass (`SplitOptions`) or the keyword parameters of the stage function (`quantize_fp8`). The recipe
schema is derived from those at load time, so a default changed in the stage is the recipe's default
too, and a recipe can never carry an option its command does not have. The stage modules are imported
only when a recipe is loaded, one by one: a stage that is not installed (or not written yet) turns into
a clear error for recipes that use it and does not break the others.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

MISSING = dataclasses.MISSING


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


STAGES: dict[str, StageDef] = {s.name: s for s in (
    StageDef("split", "moeify split", "moeify.split.convert", ("SplitOptions",), choices=_split_choices),
    StageDef("finetune", "moeify finetune", "moeify.finetune", ("FinetuneOptions",), choices=_finetune_choices),
    StageDef("quantize", "moeify quantize --fp8", "moeify.quant.quantize", ("quantize_fp8",),
             supplied=frozenset({"input_dir", "output", "overwrite", "reporter"}), choices=_quantize_choices),
    StageDef("eval", "moeify eval", "moeify.evaluate", ("EvalOptions",), produces_model=False,
             supplied=frozenset({"model", "baseline", "reporter", "output"})),
    StageDef("push", "moeify push", "moeify.publish.hub", ("plan_push", "push"), produces_model=False,
             supplied=frozenset({"folder", "plan", "token", "reporter", "progress", "retries", "backoff"})),
)}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)
MODEL_STAGES = tuple(name for name, s in STAGES.items() if s.produces_model)
