"""The recipe: one validated YAML file that describes a whole run (split, finetune, quantize, eval, push).

Loading is strict on purpose. The YAML is read with `yaml.safe_load` semantics only, after a size cap and
with anchors and aliases refused (a recipe never needs them, and they are how "billion laughs" documents
blow up). The data is validated by pydantic models with `extra="forbid"` whose stage sections are derived
from the stages' own option definitions (`moeify.pipeline.stages`), so a typo fails at load and every error names
the field *and* the line, found by composing the document to nodes and mapping each key path to its mark.
Dotted overrides (`split.experts=4`) are applied to the data before validation, so they are typed by the
same models and their errors name the override instead of a line.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from moeify.errors import InputError, UsageError
from moeify.pipeline.stages import MISSING, STAGE_ORDER, STAGES

MAX_RECIPE_BYTES = 256 * 1024
MAX_NODES = 10_000
MAX_DEPTH = 32
RECIPE_SUFFIXES = (".yaml", ".yml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RecipeBase(_Strict):
    """The stage-independent part of a recipe."""

    model: str = Field(description="Dense source: local folder, Hub id (org/name) or .gguf file.")
    revision: str | None = Field(None, description="Hub revision of `model` (branch, tag or commit).")
    output: str = Field(description="Output root; each stage writes a sub-folder named after it.")
    description: str | None = Field(None, description="Free text, shown by `moeify recipes list`.")


@dataclass
class Recipe:
    """A validated recipe: the pydantic object plus where it came from (for messages and resume)."""

    data: BaseModel
    origin: str  # file path or "<string>"
    overrides: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.data.model  # type: ignore[attr-defined]

    @property
    def revision(self) -> str | None:
        return self.data.revision  # type: ignore[attr-defined]

    @property
    def output(self) -> Path:
        return Path(self.data.output).expanduser()  # type: ignore[attr-defined]

    def stages(self) -> list[str]:
        """The stages this recipe runs, in pipeline order."""
        return [name for name in STAGE_ORDER if getattr(self.data, name, None) is not None]

    def options(self, stage: str) -> dict[str, Any]:
        section = getattr(self.data, stage)
        return section.model_dump(mode="json") if section is not None else {}

    def resolved(self) -> dict[str, Any]:
        """Every value spelled out, defaults included: what gets saved beside each output."""
        return self.data.model_dump(mode="json", exclude_none=False)

    def resolved_yaml(self) -> str:
        head = f"# Resolved from {self.origin}"
        if self.overrides:
            head += f" with {' '.join(self.overrides)}"
        return head + "\n" + yaml.safe_dump(self.resolved(), sort_keys=False, default_flow_style=False)


# --- schema ------------------------------------------------------------------------------------------


class _UnavailableStage(BaseModel):
    """Stands in for a stage whose module is missing: any section for it is reported, not half-read."""

    model_config = ConfigDict(extra="allow")


@functools.lru_cache(maxsize=1)
def recipe_model() -> tuple[type[BaseModel], dict[str, str]]:
    """The recipe's pydantic model, built from the installed stages; plus why any stage is unavailable."""
    fields: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for name, stage in STAGES.items():
        try:
            options = stage.fields()
        except (ImportError, AttributeError) as e:
            unavailable[name] = f"{type(e).__name__}: {e}"
            fields[name] = (_UnavailableStage | None, None)
            continue
        section = create_model(f"{name.capitalize()}Stage", __base__=_Strict, **{
            f.name: (f.annotation, _field_default(f)) for f in options})
        if name == "split":
            fields[name] = (section, Field(default_factory=section))
        else:
            fields[name] = (section | None, None)
    return create_model("Recipe", __base__=RecipeBase, **fields), unavailable


def _field_default(f) -> Any:
    if f.default_factory is not None:
        return Field(default_factory=f.default_factory)
    if f.default is MISSING:
        return ...
    return f.default


def stage_fields(stage: str) -> dict[str, Any]:
    """name -> default of a stage section (`...` when required): for docs and `recipes show`."""
    model, _ = recipe_model()
    annotation = model.model_fields[stage].annotation
    section = next((a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)
                    and issubclass(a, BaseModel)), None)
    if section is None or section is _UnavailableStage:
        return {}
    return {n: (f.get_default(call_default_factory=True) if not f.is_required() else ...)
            for n, f in section.model_fields.items()}


# --- loading -----------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, check and validate a recipe file; `overrides` are `key.sub=value` strings."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file", "give a .yaml path, or a shipped name from "
                         "`moeify recipes list`")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise InputError(f"{path}: {size} bytes is too large for a recipe (limit {MAX_RECIPE_BYTES})",
                         "a recipe is a short YAML file; is this the right file?")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})", "a recipe is a UTF-8 YAML file") from e
    return parse_recipe(text, str(path), overrides)


def parse_recipe(text: str, origin: str = "<string>", overrides: list[str] | None = None) -> Recipe:
    if len(text.encode("utf-8")) > MAX_RECIPE_BYTES:
        raise InputError(f"{origin}: too large for a recipe (limit {MAX_RECIPE_BYTES} bytes)")
    data, lines = _safe_yaml(text, origin)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{origin}:1: a recipe is a mapping of keys (model, output, split, ...), "
                         f"not a {type(data).__name__}", "see `moeify recipes show` for an example")
    where: dict[tuple, str] = {path: f"{origin}:{line}" for path, line in lines.items()}
    overrides = list(overrides or [])
    for item in overrides:
        key_path = apply_override(data, item)
        where[key_path] = f"override {item!r}"
    model, unavailable = recipe_model()
    try:
        validated = model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, where, origin) from None
    for name, why in unavailable.items():
        if getattr(validated, name, None) is not None:
            loc = where.get((name,), origin)
            raise UsageError(f"{loc}: the {name} stage is not available in this moeify ({why})",
                             f"remove the `{name}:` section, or install a moeify that has "
                             f"`{STAGES[name].command}`")
    return Recipe(validated, origin, overrides)


def _safe_yaml(text: str, origin: str) -> tuple[Any, dict[tuple, int]]:
    """Parse safely after refusing anchors/aliases and huge node counts; map key paths to lines."""
    try:
        count = depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            count += 1
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:  # composing is recursive: thousands of `[` exhaust Python's stack
                    raise InputError(f"{origin}:{event.start_mark.line + 1}: YAML nested more than {MAX_DEPTH} "
                                     "levels deep", "a recipe is a shallow mapping; is this the right file?")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                line = event.start_mark.line + 1
                raise InputError(f"{origin}:{line}: YAML anchors and aliases (&name, *name) are not "
                                 "allowed in recipes", "write the values out in full")
            if count > MAX_NODES:
                raise InputError(f"{origin}: too many YAML nodes for a recipe (limit {MAX_NODES})")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = (e.problem or e.context or "malformed YAML").strip()
        raise InputError(f"{origin}{line}: malformed YAML: {problem}",
                         "check indentation, colons and quotes") from None
    except yaml.YAMLError as e:
        raise InputError(f"{origin}: malformed YAML: {str(e).splitlines()[0]}") from None
    lines: dict[tuple, int] = {}
    if node is not None:
        _map_lines(node, (), lines)
    return data, lines


def _map_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (key.value,)
            lines[sub] = key.start_mark.line + 1
            _map_lines(value, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _map_lines(item, path + (i,), lines)


def apply_override(data: dict[str, Any], item: str) -> tuple:
    """Apply `a.b=value` to nested `data` in place; the value is parsed as a YAML scalar or list."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UsageError(f"override {item!r} is not key.sub=value",
                         "e.g. split.experts=4 or quantize.scheme=block")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict):
        value = raw  # a bare `a: b` in a value is text, not a mapping
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise UsageError(f"override {item!r}: {part} is not a section", "override a key inside a section")
        node = child
    node[parts[-1]] = value
    return tuple(parts)


def _validation_error(e: ValidationError, where: dict[tuple, str], origin: str) -> InputError:
    messages = [_one_error(err, where, origin) for err in e.errors()]
    first_msg, first_hint = messages[0]
    more = f" (and {len(messages) - 1} more: " + "; ".join(m for m, _ in messages[1:3]) + ")" \
        if len(messages) > 1 else ""
    return InputError(first_msg + more, first_hint)


def _one_error(err: dict, where: dict[tuple, str], origin: str) -> tuple[str, str]:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "nullable"))))
    loc = _strip_union_tags(loc)
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    place = _locate(loc, where, origin)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        valid = _valid_keys(parent)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = (f"did you mean {'.'.join([*map(str, parent), close[0]])}? " if close else "") + \
            (f"valid keys here: {', '.join(valid)}" if valid else "")
        return f"{place}: unknown key {dotted}", hint or "remove it"
    if kind == "missing":
        return f"{place}: required key {dotted} is missing", f"add `{loc[-1]}:` to the recipe"
    got = err.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return f"{place}: {dotted}: {err['msg']}{got_text}", "see `moeify recipes show` or docs/recipes.md"


def _strip_union_tags(loc: tuple) -> tuple:
    """pydantic names union members in locations (`split.SplitStage.experts`); users never wrote those."""
    return tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper() and p.endswith("Stage")))


def _locate(loc: tuple, where: dict[tuple, str], origin: str) -> str:
    for n in range(len(loc), -1, -1):
        if loc[:n] in where:
            return where[loc[:n]]
    return origin


def _valid_keys(parent: tuple) -> list[str]:
    model, _ = recipe_model()
    if not parent:
        return list(model.model_fields)
    if len(parent) == 1 and parent[0] in STAGES:
        return list(stage_fields(parent[0]))
    return []


# --- shipped recipes ---------------------------------------------------------------------------------


def shipped_dir() -> Path:
    """Where the shipped recipes are: inside the installed package (wheel), else the repo's recipes/."""
    from importlib import resources

    packaged = Path(str(resources.files("moeify") / "recipes"))  # a link to ../recipes in a checkout
    if packaged.is_dir() and any(packaged.glob("*.yaml")):
        return packaged
    return Path(__file__).resolve().parents[2] / "recipes"  # a checkout where the link did not survive


def shipped_recipes() -> dict[str, Path]:
    folder = shipped_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def find_recipe(name_or_path: str | Path) -> Path:
    """A path to an existing file, or the name of a shipped recipe (with or without .yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if str(name_or_path) == name and name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(name, list(shipped), n=3)
    raise InputError(f"{name_or_path}: no such recipe file or shipped recipe",
                     f"did you mean: {', '.join(close)}?" if close else "see `moeify recipes list`")


def recipe_header(path: Path) -> list[str]:
    """The leading comment block of a recipe (its run command and the reasons for its numbers)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines
