"""Hostile recipe files through `moeify validate` and `moeify run`: one `error:` line, exit 2, nothing run.

A recipe may come from a blog post or a stranger's repository. Malformed YAML, YAML bombs (anchors and
aliases, deep nesting, huge documents), Python object tags and unknown keys must each be refused before
any stage starts: no output root is created and no code from the file runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile import assert_clean_failure, cli, write_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("recipe-model") / "model")


def _valid(model: Path, out: Path) -> str:
    return f"model: {model}\noutput: {out}\nsplit:\n  experts: 4\n  top_k: 2\n"


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8))
RECIPES: dict[str, tuple[str, str]] = {  # name -> (text after the valid head, or whole text; expected)
    "bad indentation": ("split:\n  experts: 4\n top_k: 2\n", "malformed YAML"),
    "unclosed quote": ('description: "open\n', "malformed YAML"),
    "tab indentation": ("split:\n\texperts: 4\n", "malformed YAML"),
    "duplicate mapping in flow": ("split: {experts: 4, [1]: 2}\n", ""),
    "billion laughs": (BOMB, "anchors"),
    "one alias": ("x: &x 4\n", "anchors"),
    "deep nesting": ("x: " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
    "deep mapping nesting": ("x: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "nested"),
    "too many nodes": ("x: [" + ", ".join(["1"] * 12_000) + "]\n", "too many"),
    "huge document": ("description: '" + "x" * 300_000 + "'\n", "too large"),
    "python object tag": ("x: !!python/object/apply:os.system ['touch {marker}']\n", "malformed YAML"),
    "python name tag": ("x: !!python/name:os.system\n", "malformed YAML"),
    "unknown top-level key": ("experts: 4\n", "experts"),
    "unknown stage key": ("quantize:\n  shceme: block\n", "shceme"),
    "unknown stage": ("distill:\n  steps: 3\n", "distill"),
    "wrong type": ("quantize:\n  scheme: [block]\n", "scheme"),
    "experts zero": ("split:\n  experts: 0\n", "experts"),
    "top_k above experts": ("split:\n  experts: 4\n  top_k: 9\n", "top"),
    "finetune without a budget": ("finetune:\n  lr: 0.001\n", "budget"),
    "finetune unknown stage": ("finetune:\n  tokens: 1000\n  stage: '3'\n", "stage"),
    "finetune unknown experts forward": ("finetune:\n  tokens: 1000\n  experts_forward: fast\n", "experts-forward"),
}
WHOLE: dict[str, tuple[str, str]] = {
    "empty file": ("", "model"),
    "a list": ("- model: x\n", "mapping"),
    "a scalar": ("just text\n", "mapping"),
    "binary": ("\x00\x01\x02\xff", ""),
}


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "recipe.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(RECIPES) + list(WHOLE))
def test_hostile_recipe_is_refused_before_anything_runs(model, tmp_path, case):
    out = tmp_path / "out"
    marker = tmp_path / "MARKER-recipe-code"
    if case in WHOLE:
        text, expected = WHOLE[case]
    else:
        tail, expected = RECIPES[case]
        head = _valid(model, out)
        if case.startswith(("bad indentation", "tab", "unknown stage key", "wrong type", "experts zero", "top_k")):
            head = f"model: {model}\noutput: {out}\n"
        text = head + tail.replace("{marker}", str(marker))
    recipe = _write(tmp_path, text.encode("latin-1") if case == "binary" else text)
    for args in (["validate", recipe], ["run", recipe], ["run", recipe, "--dry-run"]):
        assert_clean_failure(cli(*args), out, contains=expected or None)
    assert not marker.exists()


@pytest.mark.parametrize("override", ["split.experts=abc", "split.experts", "=4", "nosuch.key=1",
                                      "split.experts.deeper=1", "split.top_k=-1"])
def test_bad_overrides_are_refused(model, tmp_path, override):
    out = tmp_path / "out"
    recipe = _write(tmp_path, _valid(model, out))
    assert_clean_failure(cli("run", recipe, override), out)


def test_the_valid_recipe_runs(model, tmp_path):
    """The control for the cases above: the same head without damage does run."""
    out = tmp_path / "out"
    result = cli("run", _write(tmp_path, _valid(model, out)))
    assert result.exit_code == 0, result.stderr
    assert (out / "split" / "config.json").is_file()
