"""Run a recipe's stages in order, each into its own folder under the recipe's output root, resumably.

Resume works from what is on disk, never from a state file that could disagree with it: a stage is
skipped when its folder exists and its `moeify.json` records the stage complete with the same *key*,
a hash of the stage's resolved options chained with the key of the stage before it (the first stage
hashes the source model id). So changing `split.experts` re-runs split and everything after it, while
changing `quantize.scheme` keeps split. Outputs are written atomically by the stages themselves, so an
interrupted stage leaves no folder behind and simply runs again. An existing folder with a different
key is out of date and is only replaced with `overwrite=True`.

What each stage runs, and the typed result it reports, is in the stage table (pipeline/stages.py);
this module only orders, skips and stamps. Stage modules are imported inside the stages' run
functions: a missing stage fails the run that needs it with one clear line and leaves every other
command working.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeify.errors import InputError, MoeifyError, UsageError
from moeify.metadata import METADATA_NAME, read_metadata, replace_metadata
from moeify.pipeline.recipe import Recipe
from moeify.pipeline.stages import STAGES
from moeify.progress import SILENT, Reporter

RECIPE_FILE = "recipe.yaml"


@dataclass
class Step:
    """One stage of a run: what it reads, where it writes, and whether it still has to run."""

    stage: str
    input: str
    output: Path
    options: dict[str, Any]
    key: str
    state: str  # "done" (skipped), "todo" (no output yet) or "stale" (output made with other options)
    reason: str = ""
    estimate: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"stage": self.stage, "state": self.state, "reason": self.reason, "input": self.input,
                "output": str(self.output), "options": self.options, **self.estimate}


def stage_key(stage: str, options: dict[str, Any], upstream: dict[str, Any] | str) -> str:
    payload = json.dumps({"stage": stage, "options": options, "upstream": upstream}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan_run(recipe: Recipe) -> list[Step]:
    """Every stage with its input, output, key and state, from the recipe and the disk alone (no weights)."""
    root = recipe.output
    steps: list[Step] = []
    upstream: dict[str, Any] | str = {"model": recipe.model, "revision": recipe.revision}
    model_input = recipe.model
    for stage in recipe.stages():
        options = recipe.options(stage)
        key = stage_key(stage, options, upstream)
        output = root / stage
        state, reason = _state(output, stage, key)
        steps.append(Step(stage, model_input, output, options, key, state, reason))
        upstream = key
        if STAGES[stage].produces_model:
            model_input = str(output)
    return steps


def _state(output: Path, stage: str, key: str) -> tuple[str, str]:
    if not output.exists():
        return "todo", "no output yet"
    record = read_metadata(output)["stages"].get(stage)
    if not record or not record.get("complete"):
        return "stale", f"{output} exists but its {METADATA_NAME} does not record a complete {stage} stage"
    if record.get("pipeline_key") != key:
        return "stale", f"{output} was made with different options or inputs"
    return "done", "complete with the same options"


def final_model(steps: list[Step]) -> Path | None:
    models = [s.output for s in steps if STAGES[s.stage].produces_model]
    return models[-1] if models else None


def run_recipe(recipe: Recipe, overwrite: bool = False, reporter: Reporter = SILENT,
               token: str | None = None) -> dict[str, Any]:
    """Run every stage that is not already complete; returns what each stage did."""
    steps = plan_run(recipe)
    stale = [s for s in steps if s.state == "stale"]
    if stale and not overwrite:
        s = stale[0]
        raise UsageError(f"{s.reason}", "pass --overwrite to redo out-of-date stages, or change `output:`")
    recipe.output.mkdir(parents=True, exist_ok=True)
    (recipe.output / RECIPE_FILE).write_text(recipe.resolved_yaml(), encoding="utf-8")
    ctx = RunContext(recipe, steps, reporter, token)
    results = []
    for step in steps:
        if step.state == "done":
            reporter.note(f"{step.stage}: skipped, {step.output} is complete with the same options")
            results.append({"stage": step.stage, "status": "skipped", "output": str(step.output)})
            continue
        reporter.status(f"{step.stage}: {step.input} -> {step.output}")
        started = time.perf_counter()
        result = STAGES[step.stage].run(step, ctx)
        stamp(step, recipe)
        results.append({"stage": step.stage, "status": "ran", "output": str(step.output),
                        "seconds": round(time.perf_counter() - started, 2), **result.summary()})
    return {"recipe": recipe.origin, "output": str(recipe.output),
            "final_model": str(final_model(steps) or ""), "stages": results}


def stamp(step: Step, recipe: Recipe) -> None:
    """Record the resolved recipe and the stage key in the output (moeify.json + recipe.yaml)."""
    path = step.output / METADATA_NAME
    data = read_metadata(step.output)
    record = data["stages"].get(step.stage)
    if record is None:
        raise InputError(f"{step.stage} finished but wrote no {step.stage} record in {path}",
                         "this is a bug in the stage; please report it")
    record["pipeline_key"] = step.key
    data["recipe"] = recipe.resolved()
    replace_metadata(step.output, data)
    (step.output / RECIPE_FILE).write_text(recipe.resolved_yaml(), encoding="utf-8")


@dataclass
class RunContext:
    recipe: Recipe
    steps: list[Step]
    reporter: Reporter
    token: str | None = None
    _source: Any = None

    def source_folder(self) -> Path:
        """The dense source as a local folder (downloaded or converted once; cached by the source module)."""
        if self._source is None:
            from moeify.source import resolve_source

            self._source = resolve_source(self.recipe.model, revision=self.recipe.revision, token=self.token,
                                          reporter=self.reporter)
        return self._source.folder

    def last_model(self, before: Step) -> Path | None:
        found = None
        for s in self.steps:
            if s is before:
                break
            if STAGES[s.stage].produces_model:
                found = s.output
        return found


__all__ = ["Step", "plan_run", "run_recipe", "stamp", "stage_key", "final_model", "MoeifyError"]
