"""`moeify run RECIPE [key.sub=value ...] [--dry-run]` and `moeify validate RECIPE`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from moeify.cli.common import JsonOpt, QuietOpt, TokenOpt, cli_command
from moeify.cli.console import Output

if TYPE_CHECKING:
    from moeify.pipeline.checks import CheckResult
    from moeify.pipeline.recipe import Recipe

RecipeArg = Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe (`moeify recipes "
                                          "list`).")]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. split.experts=4 "
                                                          "quantize.scheme=block output=./out.",
                                                          show_default=False)]


@cli_command
def run(
    out: Output,
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (stages, inputs, outputs, expected "
                                          "sizes, activation ratio) and stop; reads no weights.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo stages whose existing output was made "
                                            "with other options (complete, matching stages are still skipped).")]
    = False,
    token: TokenOpt = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe: split, then finetune, quantize, eval and push as the recipe says; resumable."""
    from moeify.pipeline.runner import run_recipe

    loaded, check = _load_and_check(recipe, overrides, out)
    if dry_run:
        data = {"dry_run": True, "recipe": loaded.origin, **check.as_dict()}
        out.result(data, title=f"plan for {loaded.origin}", rows=_plan_rows(loaded, check),
                   tables=[_steps_table(check)])
        return
    result = run_recipe(loaded, overwrite=overwrite, reporter=out, token=token)
    rows = [("recipe", loaded.origin), ("output", result["output"]), ("final model", result["final_model"]),
            ("activation ratio", _pct(check.activation_ratio))]
    table = Table("stage", "status", "output", "time", box=None, pad_edge=False, title="stages")
    for s in result["stages"]:
        table.add_row(s["stage"], s["status"], s["output"], f"{s['seconds']:.1f} s" if "seconds" in s else "")
    out.result(result, title="run", rows=rows, tables=[table])


@cli_command
def validate(
    out: Output,
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check a recipe (keys, types, values) and, when the model is reachable, its fit to the model: no weights."""
    loaded, check = _load_and_check(recipe, overrides, out)
    data = {"valid": True, "recipe": loaded.origin, "stages": loaded.stages(), **check.as_dict()}
    rows = [("valid", "yes"), ("recipe", loaded.origin), ("stages", " -> ".join(loaded.stages())),
            ("checked against", check.checked_against), ("activation ratio", _pct(check.activation_ratio))]
    out.result(data, title="validate", rows=rows)


def _load_and_check(recipe: str, overrides: list[str] | None, out: Output) -> tuple[Recipe, CheckResult]:
    """The preamble of `run` and `validate`: find, load and check the recipe, and say what could not be checked.

    One place, so `validate` and `run` can never disagree about whether a recipe is valid.
    """
    from moeify.pipeline.checks import check_recipe
    from moeify.pipeline.recipe import find_recipe, load_recipe

    loaded = load_recipe(find_recipe(recipe), overrides or [])
    check = check_recipe(loaded, reporter=out)
    for note in check.notes:
        out.note(note)
    return loaded, check


def _plan_rows(loaded, check) -> list[tuple[str, Any]]:
    return [("recipe", loaded.origin), ("model", loaded.model), ("output root", str(loaded.output)),
            ("checked against", check.checked_against),
            ("source size", _size(check.source_bytes)), ("activation ratio", _pct(check.activation_ratio))]


def _steps_table(check) -> Table:
    """One row per stage: state, expected size, input -> output, shape details (wraps well in narrow terminals)."""
    table = Table(show_header=False, box=None, pad_edge=False, title="stages")
    table.add_column(style="bold")
    table.add_column()
    for step in check.steps:
        est = step.estimate
        parts = [step.state, f"{step.input} -> {step.output}"]
        if "expected_bytes" in est:
            parts.append(f"expected {_size(est['expected_bytes'])}")
        if "architecture" in est:
            o = step.options
            parts.append(f"{est['architecture']}: {o.get('experts')} experts (top-{o.get('top_k')}, "
                         f"{o.get('shared')} shared) of {est.get('expert_size')} neurons")
        if "scheme" in est:
            parts.append(f"FP8 {est['scheme']} ({est['scheme_reason']})")
        table.add_row(step.stage, "; ".join(parts))
    return table


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.1%} of the dense FFN per token"
