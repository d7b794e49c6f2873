"""The Hub token never appears anywhere a run leaves traces, and code shipped with a checkpoint never runs.

Every run here is given a marker token (via --token and HF_TOKEN) and then every artifact is searched
for it: stdout and stderr (human and --json), every file in every output folder (moeify.json, model card,
resolved recipes, logs), error messages, and what a local fake Hub received outside the Authorization
header. Remote code is a config `auto_map` plus `.py` files that would create a marker file on import.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeify.cli.common import run_command
from moeify.cli.console import Output
from tests.hostile import TOKEN, cli, write_checkpoint

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune.\n" * 40


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    from tests.char_tokenizer import add_char_tokenizer

    return add_char_tokenizer(write_checkpoint(tmp_path_factory.mktemp("security") / "dense"))


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def token_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", TOKEN)


class Traces:
    """Everything a sequence of runs left: their output streams and the files of the folders they wrote."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []
        self.folders: list[Path] = []

    def run(self, *args, ok: bool = True):
        result = cli(*args)
        self.texts.append((" ".join(map(str, args)), result.stdout + result.stderr))
        if ok:
            assert result.exit_code == 0, result.stderr
        return result

    def assert_no_token(self) -> int:
        """Search every trace for the token (and its distinctive part); returns how many artifacts were read."""
        needles = [TOKEN, TOKEN[3:]]
        count = 0
        for what, text in self.texts:
            count += 1
            assert not any(n in text for n in needles), what
        for folder in self.folders:
            for path in folder.rglob("*"):
                if path.is_file():
                    count += 1
                    data = path.read_bytes()
                    assert not any(n.encode() in data for n in needles), path
        return count


def test_token_in_no_artifact_of_split_quantize_inspect_and_dry_run_push(dense, tmp_path, token_env):
    traces = Traces()
    moe, moe_json, fp8 = tmp_path / "moe", tmp_path / "moe-json", tmp_path / "fp8"
    traces.folders += [moe, moe_json, fp8]
    traces.run("split", dense, "-o", moe, "--experts", "4", "--token", TOKEN)
    traces.run("split", dense, "-o", moe_json, "--experts", "4", "--method", "weights", "--token", TOKEN, "--json")
    traces.run("quantize", moe, "--fp8", "-o", fp8)
    traces.run("quantize", moe, "--fp8", "-o", fp8, "--overwrite", "--json")
    traces.run("inspect", fp8)
    traces.run("inspect", fp8, "--json")
    traces.run("push", fp8, "me/tiny", "--dry-run", "--token", TOKEN)
    traces.run("push", fp8, "me/tiny", "--dry-run", "--token", TOKEN, "--json")
    assert traces.assert_no_token() > 20


def test_token_in_no_error_message(dense, tmp_path, token_env, monkeypatch):
    traces = Traces()
    out = tmp_path / "out"
    traces.run("split", "some-org/some-model", "-o", out, "--token", TOKEN, ok=False)  # offline: not cached
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("moeify.publish.hub.BACKOFF_SECONDS", 0.001)
    traces.run("split", "some-org/some-model", "-o", out, "--token", TOKEN, ok=False)
    traces.run("push", dense, "me/tiny", "--token", TOKEN, ok=False)
    traces.run("quantize", tmp_path / "missing", "--fp8", "-o", out, ok=False)
    for _, text in traces.texts:
        assert "error:" in text and "Traceback" not in text
    traces.assert_no_token()


def test_exception_text_with_a_token_is_redacted(capsys):
    """The last line of defence: an unexpected exception that quotes a token prints it blanked out."""
    import typer

    def boom():
        raise RuntimeError(f"request failed with headers {{'authorization': 'Bearer {TOKEN}'}}")

    with pytest.raises(typer.Exit):
        run_command(Output(), boom)
    err = capsys.readouterr().err
    assert "internal error" in err and "hf_***" in err and TOKEN not in err


def test_token_in_no_artifact_of_a_push_to_a_local_hub(dense, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.hub_server import FakeHub

    server = FakeHub(TOKEN).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr("moeify.publish.hub.BACKOFF_SECONDS", 0.001)
        traces = Traces()
        moe = tmp_path / "moe"
        traces.folders.append(moe)
        traces.run("split", dense, "-o", moe, "--experts", "4", "--method", "weights")
        traces.run("push", moe, "me/tiny-moe", "--token", TOKEN)
        traces.run("push", moe, "me/tiny-moe", "--json")  # token from HF_TOKEN
        traces.run("push", moe, "me/tiny-moe", "--token", "hf_WRONGtoken0123456789", ok=False)
        traces.assert_no_token()
        assert "hf_WRONGtoken0123456789" not in traces.texts[-1][1]
        secret = TOKEN.encode()
        assert server.requests
        for req in server.requests:
            assert secret not in req.body and TOKEN not in req.path
            assert all(TOKEN not in v for k, v in req.headers.items() if k.lower() != "authorization")
        for repo in server.repos.values():
            for files in repo.branches.values():
                assert files and all(secret not in data for data in files.values())
    finally:
        server.stop()


def test_token_in_no_artifact_of_a_recipe_run(dense, tmp_path, token_env):
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {dense}\noutput: {out}\nsplit:\n  experts: 4\n  top_k: 2\n  method: weights\n"
                      "quantize:\n  scheme: channel\n")
    traces = Traces()
    traces.folders.append(out)
    traces.run("run", recipe, "--token", TOKEN)
    traces.run("run", recipe, "--token", TOKEN, "--dry-run")
    traces.run("validate", recipe)
    assert (out / "quantize" / "config.json").is_file()
    traces.assert_no_token()


def test_token_in_no_artifact_of_finetune_and_eval(dense, text, tmp_path, token_env):
    moe, ft, log = tmp_path / "moe", tmp_path / "ft", tmp_path / "train.jsonl"
    traces = Traces()
    traces.folders += [moe, ft]
    traces.run("split", dense, "-o", moe, "--experts", "4", "--method", "weights", "--token", TOKEN)
    traces.run("finetune", moe, "-o", ft, "--teacher", dense, "--data", text, "--max-steps", "2", "--stage", "2",
               "--seq-len", "32", "--batch-size", "2", "--log-file", log, "--device", "cpu")
    traces.run("eval", ft, "--baseline", dense, "--text", text, "--seq-len", "32", "--max-chunks", "1", "--json")
    assert log.read_text().strip()
    traces.texts.append(("log file", log.read_text()))
    traces.assert_no_token()


def _with_remote_code(folder: Path, marker: Path) -> None:
    code = f"open({str(marker)!r}, 'w').close()\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(code)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                          "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))


def test_remote_code_never_runs_in_eval_finetune_or_a_recipe(dense, text, tmp_path):
    import shutil

    marker = tmp_path / "MARKER-remote-code"
    evil = Path(shutil.copytree(dense, tmp_path / "evil"))
    _with_remote_code(evil, marker)
    moe, ft = tmp_path / "moe", tmp_path / "ft"
    results = [cli("split", evil, "-o", moe, "--experts", "4", "--method", "weights")]
    _with_remote_code(moe, marker)  # a downloaded MoE with the same trap
    results.append(cli("eval", moe, "--baseline", evil, "--text", text, "--seq-len", "32", "--max-chunks", "1"))
    results.append(cli("finetune", moe, "-o", ft, "--teacher", evil, "--data", text, "--max-steps", "1",
                       "--stage", "2", "--seq-len", "32", "--batch-size", "2", "--device", "cpu"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {evil}\noutput: {tmp_path / 'run'}\nsplit:\n  experts: 4\n  top_k: 2\n"
                      "  method: weights\n")
    results.append(cli("run", recipe))
    results.append(cli("inspect", moe))
    assert not marker.exists()
    for result in results:  # stock classes are used; the shipped code is ignored, not run
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
