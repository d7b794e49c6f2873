"""`moeify recipes list`, `moeify recipes show NAME` and `moeify recipes cp NAME DEST`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moeify.cli.common import JsonOpt, QuietOpt, cli_command
from moeify.cli.console import Output

NameArg = Annotated[str, typer.Argument(help="A shipped recipe's name (see `moeify recipes list`).")]


@cli_command
def list_recipes(out: Output, json_mode: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """List the shipped recipes with their model and shape."""
    from moeify.pipeline.recipe import load_recipe, shipped_dir, shipped_recipes

    items = []
    table = Table("name", "model", "experts", "stages", box=None, pad_edge=False)
    for name, path in shipped_recipes().items():
        recipe = load_recipe(path)
        split = recipe.options("split")
        shape = f"{split['experts']} top-{split['top_k']}" + (f" +{split['shared']} shared"
                                                               if split["shared"] else "")
        items.append({"name": name, "model": recipe.model, "stages": recipe.stages(), "path": str(path),
                      "description": recipe.data.description})  # type: ignore[attr-defined]
        table.add_row(name, recipe.model, shape, ",".join(recipe.stages()))
    out.result({"folder": str(shipped_dir()), "recipes": items}, rows=[("folder", str(shipped_dir()))],
               tables=[table])


@cli_command
def show(out: Output, name: NameArg) -> None:
    """Print a shipped recipe (its file, comments included) to stdout."""
    from moeify.pipeline.recipe import find_recipe

    typer.echo(find_recipe(name).read_text(encoding="utf-8"), nl=False)


@cli_command
def copy(
    out: Output,
    name: NameArg,
    dest: Annotated[Path, typer.Argument(help="File or folder to copy the recipe to.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DEST if it exists.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Copy a shipped recipe to edit it; run the copy with `moeify run DEST`."""
    from moeify.errors import UsageError
    from moeify.pipeline.recipe import find_recipe

    src = find_recipe(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists", "pass --overwrite or choose another DEST")
    shutil.copyfile(src, target)
    out.result({"copied": str(src), "to": str(target)}, rows=[("copied to", str(target)),
                                                              ("run it with", f"moeify run {target}")])
