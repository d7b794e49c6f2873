"""`moeify run`: a full recipe on a tiny model, resume after an interrupted stage, dry-run estimates, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from moeify.cli import app
from moeify.errors import UsageError
from moeify.metadata import read_metadata
from moeify.pipeline.checks import check_recipe
from moeify.pipeline.recipe import parse_recipe
from moeify.pipeline.runner import plan_run, run_recipe


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.tiny_models import build

    return build("llama", tmp_path_factory.mktemp("pipeline") / "llama", seed=3)


def _recipe(model, out, *overrides, extra: str = ""):
    text = f"model: {model}\noutput: {out}\nsplit:\n  experts: 4\n  top_k: 4\nquantize:\n  scheme: channel\n{extra}"
    return parse_recipe(text, "tiny.yaml", list(overrides))


def _logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_full_run_then_resume_skips_everything(tiny_llama, tmp_path):
    out = tmp_path / "run"
    recipe = _recipe(tiny_llama, out)
    result = run_recipe(recipe)
    assert [s["status"] for s in result["stages"]] == ["ran", "ran"]

    # The split with every expert active is the dense model: the pipeline ran the real stage.
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    dense, moe = _logits(tiny_llama, ids), _logits(out / "split", ids)
    assert torch.allclose(dense, moe, atol=1e-4, rtol=1e-4), (dense - moe).abs().max()

    for stage in ("split", "quantize"):
        meta = read_metadata(out / stage)
        assert meta["stages"][stage]["complete"] is True
        assert meta["recipe"] == recipe.resolved()
        assert (out / stage / "recipe.yaml").read_text().startswith("# Resolved from tiny.yaml")
    assert read_metadata(out / "quantize")["stages"].keys() >= {"split", "quantize"}

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = run_recipe(recipe)
    assert [s["status"] for s in again["stages"]] == ["skipped", "skipped"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes


def test_resume_after_an_interrupted_stage(tiny_llama, tmp_path, monkeypatch):
    import moeify.quant.quantize as quantize_module

    out = tmp_path / "run"
    recipe = _recipe(tiny_llama, out)
    real = quantize_module.ShardedWriter

    class Killed(real):  # dies halfway through writing the quantized shards
        def write(self, name, tensor):
            if "layers.1." in name:
                raise KeyboardInterrupt
            return super().write(name, tensor)

    monkeypatch.setattr(quantize_module, "ShardedWriter", Killed)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe)
    assert (out / "split" / "moeify.json").is_file()
    assert not (out / "quantize").exists(), "an interrupted stage leaves no output folder"
    assert [s.state for s in plan_run(recipe)] == ["done", "todo"]

    monkeypatch.setattr(quantize_module, "ShardedWriter", real)
    split_mtime = (out / "split" / "moeify.json").stat().st_mtime_ns
    result = run_recipe(recipe)
    assert [s["status"] for s in result["stages"]] == ["skipped", "ran"]
    assert (out / "split" / "moeify.json").stat().st_mtime_ns == split_mtime
    assert read_metadata(out / "quantize")["stages"]["quantize"]["complete"] is True


def test_changed_options_redo_only_the_stages_they_affect(tiny_llama, tmp_path):
    out = tmp_path / "run"
    run_recipe(_recipe(tiny_llama, out))
    changed = _recipe(tiny_llama, out, "quantize.scheme=tensor")
    assert [s.state for s in plan_run(changed)] == ["done", "stale"]
    with pytest.raises(UsageError, match="made with different options"):
        run_recipe(changed)
    result = run_recipe(changed, overwrite=True)
    assert [s["status"] for s in result["stages"]] == ["skipped", "ran"]
    assert read_metadata(out / "quantize")["stages"]["quantize"]["scheme"] == "tensor"
    # A split option changes every key after it.
    assert [s.state for s in plan_run(_recipe(tiny_llama, out, "split.seed=1"))] == ["stale", "stale"]


def test_dry_run_estimates_match_the_real_outputs(tiny_llama, tmp_path):
    out = tmp_path / "run"
    recipe = _recipe(tiny_llama, out, "split.top_k=1")
    check = check_recipe(recipe)
    split_est, quant_est = (s.estimate for s in check.steps)
    assert check.activation_ratio == pytest.approx(0.25)
    assert not out.exists(), "a dry run writes nothing"
    run_recipe(recipe)
    written = {s: read_metadata(out / s)["stages"][s]["output_bytes"] for s in ("split", "quantize")}
    assert split_est["expected_bytes"] == written["split"]
    assert quant_est["expected_bytes"] == written["quantize"]
    assert quant_est["scheme"] == "channel"


def test_cli_run_validate_and_dry_run(tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "out"
    recipe.write_text(f"model: {tiny_llama}\noutput: {out}\nsplit:\n  experts: 4\n  top_k: 2\n")
    runner = CliRunner()
    res = runner.invoke(app, ["validate", str(recipe), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["activation_ratio"] == pytest.approx(0.5)

    res = runner.invoke(app, ["run", str(recipe), "--dry-run", "--json", "split.top_k=1"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["activation_ratio"] == pytest.approx(0.25)
    assert [s["stage"] for s in plan["steps"]] == ["split"] and not out.exists()

    res = runner.invoke(app, ["run", str(recipe), "--json"])
    assert res.exit_code == 0, res.output
    assert (out / "split" / "config.json").is_file()

    recipe.write_text(f"model: {tiny_llama}\noutput: {out}\nsplit:\n  experts: 400\n")
    res = runner.invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 2
    assert "400 experts" in res.output and "r.yaml" in res.output

    recipe.write_text(f"model: {tiny_llama}\noutput: {out}\nsplit:\n  top-k: 1\n")
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 2
    assert "r.yaml:4: unknown key split.top-k" in " ".join(res.output.split())


def test_cli_run_and_validate_check_a_recipe_the_same_way(tmp_path):
    """Both commands share one preamble: same verdict, and both say when the model could not be checked."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: moeify-tests/no-such-model\noutput: {tmp_path / 'out'}\nsplit:\n  experts: 4\n")
    runner = CliRunner()
    for args in (["validate", str(recipe)], ["run", str(recipe), "--dry-run"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert "only the recipe itself was checked" in " ".join(res.stderr.split()), (args, res.stderr)
    validated = runner.invoke(app, ["validate", str(recipe), "--json"])
    planned = runner.invoke(app, ["run", str(recipe), "--dry-run", "--json"])
    a, b = json.loads(validated.stdout), json.loads(planned.stdout)
    assert a["notes"] and "is not on this machine" in a["notes"][0]
    for key in ("checked_against", "activation_ratio", "notes", "steps"):
        assert a[key] == b[key], key
    assert not (tmp_path / "out").exists()

    recipe.write_text(f"model: moeify-tests/no-such-model\noutput: {tmp_path / 'out'}\nsplit:\n  experts: many\n")
    for args in (["validate", str(recipe)], ["run", str(recipe), "--dry-run"], ["run", str(recipe)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "split.experts" in res.output, (args, res.output)


def test_cli_recipes_list_show_cp(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["recipes", "list", "--json"])
    assert res.exit_code == 0, res.output
    names = [r["name"] for r in json.loads(res.stdout)["recipes"]]
    assert "qwen3-0.6b-8x2-fp8" in names and len(names) >= 11
    res = runner.invoke(app, ["recipes", "show", "qwen3-0.6b-8x2-fp8"])
    assert res.exit_code == 0 and res.stdout.startswith("# Qwen/Qwen3-0.6B")
    res = runner.invoke(app, ["recipes", "cp", "qwen3-0.6b-8x2-fp8", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "qwen3-0.6b-8x2-fp8.yaml").is_file()
    res = runner.invoke(app, ["recipes", "cp", "qwen3-0.6b-8x2-fp8", str(tmp_path)])
    assert res.exit_code == 2


def test_split_finetune_eval_stages_chain(tiny_llama, tmp_path, shared_text):
    """finetune reads split's output and eval the finetuned model, against the dense source as baseline."""
    from tests.char_tokenizer import add_char_tokenizer

    dense = add_char_tokenizer(tiny_llama, copy_to=tmp_path / "dense")
    text = tmp_path / "text.txt"
    text.write_text(shared_text("sense_and_sensibility.txt")[:20000])
    out = tmp_path / "run"
    recipe = parse_recipe(
        f"model: {dense}\noutput: {out}\nsplit:\n  experts: 4\n  top_k: 2\n"
        f"finetune:\n  stage: '1'\n  data: {text}\n  seq_len: 32\n  calibration_tokens: 512\n  router_steps: 3\n"
        f"  device: cpu\neval:\n  text: {text}\n  seq_len: 32\n  max_chunks: 2\n", "chain.yaml")
    result = run_recipe(recipe)
    assert [s["status"] for s in result["stages"]] == ["ran", "ran", "ran"]
    assert result["final_model"] == str(out / "finetune")
    evaluated = json.loads((out / "eval" / "eval.json").read_text())
    assert evaluated["model"] == str(out / "finetune")
    assert evaluated["perplexity"] > 1 and evaluated["baseline_perplexity"] > 1
    assert evaluated["activation_ratio"] == pytest.approx(0.5)
    # The evaluated model carries the numbers, so its model card can show them.
    assert read_metadata(out / "finetune")["stages"]["eval"]["perplexity"] == evaluated["perplexity"]
    assert read_metadata(out / "finetune")["stages"]["finetune"]["pipeline_key"] == \
        plan_run(recipe)[1].key
    assert [s["status"] for s in run_recipe(recipe)["stages"]] == ["skipped"] * 3


def test_push_stage_uploads_the_last_model_with_the_recipe_in_its_card(tiny_llama, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.hub_server import FakeHub

    token = "hf_PIPELINEtoken0123456789"
    server = FakeHub(token).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        out = tmp_path / "run"
        recipe = _recipe(tiny_llama, out, extra="push:\n  repo_id: me/tiny-moe-fp8\n")
        result = run_recipe(recipe, token=token)
        assert [s["stage"] for s in result["stages"]] == ["split", "quantize", "push"]
        files = server.files("me/tiny-moe-fp8")
        assert files["model.safetensors"] == (out / "quantize" / "model.safetensors").read_bytes()
        card = files["README.md"].decode()
        # the recipe is in the card, its local output path reduced to the folder name (issue 17: no local paths)
        assert "Recipe" in card and f"output: {out.name}" in card and str(out) not in card
        assert token.encode() not in b"".join(files.values())
        assert read_metadata(out / "push")["stages"]["push"]["repo_id"] == "me/tiny-moe-fp8"
    finally:
        server.stop()
