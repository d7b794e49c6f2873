"""The CLI's wiring: every command registered in one place, one decorator for the output sink and errors."""

from __future__ import annotations

import inspect
import json

import pytest
import typer
from typer.testing import CliRunner

from moeify.cli import app
from moeify.cli.common import cli_command
from moeify.cli.console import Output
from moeify.errors import UsageError

COMMANDS = {"split", "finetune", "quantize", "dequantize", "eval", "inspect", "push", "run", "validate", "demo",
            "recipes"}


def _click_app():
    return typer.main.get_command(app)


def test_every_command_is_wired():
    group = _click_app()
    assert set(group.commands) == COMMANDS
    assert set(group.commands["recipes"].commands) == {"list", "show", "cp"}


def test_command_modules_do_not_register_themselves():
    """Importing a command module must not need, or touch, the app (no registration by import side effect)."""
    import moeify.cli as cli_package

    for name in ("demo_cmd", "eval_cmd", "finetune_cmd", "inspect_cmd", "push_cmd", "quantize_cmd",
                 "recipes_cmd", "run_cmd", "split_cmd"):
        source = inspect.getsource(getattr(cli_package, name))
        assert "from moeify.cli import app" not in source and "@app." not in source, name


def test_decorator_builds_the_sink_from_json_and_quiet_and_hides_it(capsys):
    seen = {}

    @cli_command
    def hello(out: Output, who: str = "x", json_mode: bool = False, quiet: bool = False) -> None:
        seen["out"] = out
        out.result({"hello": who})

    assert list(inspect.signature(hello).parameters) == ["who", "json_mode", "quiet"]
    hello(who="moe", json_mode=True, quiet=False)
    assert seen["out"].json_mode and json.loads(capsys.readouterr().out) == {"hello": "moe"}
    hello(who="moe", json_mode=False, quiet=True)
    assert seen["out"].quiet and capsys.readouterr().out == ""


def test_decorator_formats_errors_once(capsys):
    @cli_command
    def fails(out: Output) -> None:
        raise UsageError("bad value", "use a good one")

    with pytest.raises(typer.Exit) as info:
        fails()
    assert info.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "bad value" in err and "use a good one" in err


def test_rank_zero_only_silences_other_processes(capsys, monkeypatch):
    @cli_command(rank_zero_only=True)
    def job(out: Output, json_mode: bool = False) -> None:
        out.result({"done": True})

    monkeypatch.setenv("RANK", "1")
    job(json_mode=True)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    job(json_mode=True)
    assert json.loads(capsys.readouterr().out) == {"done": True}


@pytest.mark.parametrize("args", [[], ["finetune"], ["quantize"], ["split"], ["recipes", "cp"]])
def test_flags_do_not_render_as_taking_a_value(args):
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--help" in result.output and "<bool>" not in result.output
