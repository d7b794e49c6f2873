"""The model card pushed with a checkpoint: Hub metadata plus how the model was made and how to run it.

Everything comes from the folder itself (config.json and moeify.json), so a card can be rebuilt at any
time and says exactly what the files hold. The metadata goes through huggingface_hub's `ModelCardData`,
which writes the YAML the Hub validates. moeify.json is read tolerantly: stages it lacks, or keys an older
or newer moeify wrote differently, leave their section out rather than failing the push.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from moeify.io.reader import load_json
from moeify.metadata import read_metadata

# Licences we can vouch for by base-model id, for sources whose files do not state one.
KNOWN_LICENSES = (
    (re.compile(r"^HuggingFaceTB/SmolLM2-"), "apache-2.0"),
    (re.compile(r"^Qwen/Qwen3-"), "apache-2.0"),
    (re.compile(r"^mistralai/Mistral-7B-"), "apache-2.0"),
    (re.compile(r"^meta-llama/Llama-3\.1-"), "llama3.1"),
    (re.compile(r"^meta-llama/Llama-3\.2-"), "llama3.2"),
    (re.compile(r"^meta-llama/Llama-3\.3-"), "llama3.3"),
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# GGUF files whose Hub origin is known though their metadata does not name it (the demo's model).
KNOWN_GGUF_ORIGINS = {"SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# An absolute or home-relative local path inside a text (not a URL's `//host/...`, not `org/name`).
_LOCAL_PATH = re.compile(r"(?<![\w.:/~-])(?:~/|/|[A-Za-z]:\\)[^\s|`'\"()<>\[\],]+")
_HF_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:/|\.git)?$")
# Bookkeeping keys of a stage record that say nothing about the model itself.
_BOOKKEEPING = {"moeify_version", "complete", "hardware", "timings", "seconds", "started", "finished",
                "notes", "layers", "per_layer", "losses", "source", "options", "command", "recipe"}


def build_card(folder: str | Path, repo_id: str) -> str:
    """The README.md text (YAML front matter + Markdown) for the checkpoint in `folder`."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = load_json(folder / "config.json", "config.json")
    meta = read_metadata(folder)
    stages: dict[str, Any] = {k: v for k, v in meta.get("stages", {}).items() if isinstance(v, dict)}
    split = stages.get("split", {})
    source = split.get("source") if isinstance(split.get("source"), dict) else {}
    base_model = _base_model(source)
    fp8 = _is_fp8(config)  # the config is the truth: a later `dequantize` stage undoes `quantize`
    tags = ["moe", "moeify", "mixture-of-experts"]
    if fp8:
        tags.append("fp8")
    if isinstance(config.get("model_type"), str):
        tags.append(config["model_type"])
    relation = None
    if base_model:
        relation = "finetune" if "split" in stages or "finetune" in stages else "quantized"
    data = ModelCardData(
        base_model=base_model,
        base_model_relation=relation,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=_license(meta, split, source, base_model),
        tags=tags,
    )
    body = public_text(_body(repo_id, config, meta, stages, source, base_model, fp8, data.license))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return str(card).rstrip("\n") + "\n"


def _base_model(source: dict[str, Any]) -> str | None:
    """The Hub id the model derives from: a Hub source's id, or a GGUF's recorded or known origin."""
    ident = source.get("id")
    if source.get("kind") == "hub" and isinstance(ident, str) and _HUB_ID.match(ident):
        return ident
    if source.get("kind") == "gguf":
        origin = source.get("origin")
        if isinstance(origin, str) and _HUB_ID.match(origin):
            return origin
        name = source.get("gguf_file") or (Path(ident).name if isinstance(ident, str) else None)
        found = _gguf_origin(Path(ident)) if isinstance(ident, str) else None
        return found or KNOWN_GGUF_ORIGINS.get(str(name))
    return None


def _gguf_origin(path: Path) -> str | None:
    """A Hub id from a GGUF's own metadata (`general.base_model.0.repo_url`, `general.source.url`, ...)."""
    if not path.is_file():
        return None
    try:
        import gguf

        fields = gguf.GGUFReader(path).fields
        for key in ("general.source.huggingface.repository", "general.base_model.0.repo_url", "general.source.url",
                    "general.repo_url"):
            field = fields.get(key)
            if field is None:
                continue
            value = str(field.contents()).strip()
            match = _HF_URL.match(value)
            if match:
                return match.group(1)
            if _HUB_ID.match(value):
                return value
    except Exception:  # noqa: BLE001 - an unreadable GGUF only means "origin unknown"
        return None
    return None


def public_text(text: str) -> str:
    """`text` with every local path replaced by its last component: a card is public, the machine is not.

    Paths reach a card from many records (the resolved recipe's model and output, calibration and training
    data, an eval's model and baseline folders, a GGUF inside a virtual environment); one pass over the whole
    text guards them all, including keys a later moeify adds. Hub ids (`org/name`) and URLs are kept.
    """
    return _LOCAL_PATH.sub(lambda m: re.split(r"[\\/]", m.group(0).rstrip("/\\"))[-1] or "(local path)", text)


def public_record(value: Any) -> Any:
    """`value` (a parsed moeify.json) with `public_text` applied to every string, keys included.

    The folder's moeify.json keeps absolute paths on purpose (finetune reads the split's source back from
    it); the copy a push uploads is public, so it gets the card's scrubbing, string by string, which also
    catches Windows paths that JSON escaping would hide from a pass over the raw text.
    """
    if isinstance(value, str):
        return public_text(value)
    if isinstance(value, dict):
        return {public_text(str(k)): public_record(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_record(v) for v in value]
    return value
    return None


def _is_fp8(config: dict[str, Any]) -> bool:
    q = config.get("quantization_config")
    return isinstance(q, dict) and ("fp8" in json.dumps(q).lower() or "float-quantized" in json.dumps(q))


def _license(meta: dict, split: dict, source: dict, base_model: str | None) -> str | None:
    """The source's licence where it is known for sure; None otherwise (the card then says so)."""
    for record in (source, split, meta):
        value = record.get("license")
        if isinstance(value, str) and value:
            return value
    ident = source.get("id")
    if isinstance(ident, str) and source.get("kind") in ("local", "gguf"):
        path = Path(ident)
        found = _license_from_gguf(path) if source.get("kind") == "gguf" else _license_from_readme(path)
        if found:
            return found
    if base_model:
        for pattern, value in KNOWN_LICENSES:
            if pattern.match(base_model):
                return value
    return None


def _license_from_readme(folder: Path) -> str | None:
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        value = ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except Exception:  # noqa: BLE001 - a broken source README just means "licence unknown"
        return None
    return value if isinstance(value, str) else None


def _license_from_gguf(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        import gguf

        field = gguf.GGUFReader(path).fields.get("general.license")
        value = field.contents() if field is not None else None
    except Exception:  # noqa: BLE001 - an unreadable GGUF header just means "licence unknown"
        return None
    return value if isinstance(value, str) and value else None


# --- Markdown body --------------------------------------------------------------------------------


def _body(repo_id: str, config: dict, meta: dict, stages: dict, source: dict, base_model: str | None,
          fp8: bool, license_id: str | None) -> str:
    name = repo_id.split("/")[-1]
    arch = (config.get("architectures") or ["?"])[0]
    split = stages.get("split", {})
    options = split.get("options") if isinstance(split.get("options"), dict) else {}
    lines = [f"# {name}", ""]
    origin = _source_text(source)
    if base_model:
        link = f"[{base_model}](https://huggingface.co/{base_model})"
        origin = f"{origin} of {link}" if source.get("kind") == "gguf" else link
    experts = _first(options.get("experts"), config.get("num_local_experts"), config.get("num_experts"))
    top_k = _first(options.get("top_k"), config.get("num_experts_per_tok"))
    what = f"a Mixture-of-Experts `{arch}`"
    if experts and top_k:
        what += f" with {experts} experts, {top_k} active per token"
    lines.append(f"This is {what}, converted from {origin} with moeify"
                 + (" and quantized to FP8." if fp8 else "."))
    lines.append("It is a stock transformers architecture: no `trust_remote_code` is needed.")
    lines.append("")
    rows = _conversion_rows(config, stages, options)
    if rows:
        lines += ["## Conversion", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
        lines.append("")
    evaluation = _eval_table(stages.get("eval"))
    if evaluation:
        lines += ["## Evaluation", "", *evaluation, ""]
    lines += _usage(repo_id, fp8)
    recipe = meta.get("recipe") or split.get("recipe")
    if recipe:
        lines += ["## Recipe", "", "The resolved recipe this model was made with:", "", "```yaml",
                  _yaml(recipe).rstrip("\n"), "```", ""]
    lines += ["## License", ""]
    if license_id:
        lines.append(f"`{license_id}`, inherited from the base model; its terms apply to this derivative.")
    else:
        lines.append("The base model's license applies to this derivative; moeify could not determine it, "
                     "so check the base model's terms before use.")
    lines.append("")
    version = meta.get("moeify_version")
    lines.append(f"*Made with moeify {version}.*" if version else "*Made with moeify.*")
    return "\n".join(lines) + "\n"


def _yaml(value: Any) -> str:
    import yaml

    try:
        return yaml.safe_dump(json.loads(json.dumps(value, default=str)), sort_keys=False)
    except yaml.YAMLError:  # pragma: no cover - JSON-shaped data always dumps
        return json.dumps(value, indent=2, default=str)


def _source_text(source: dict) -> str:
    kind, ident = source.get("kind"), source.get("id")
    if kind == "gguf" and isinstance(ident, str):
        return f"the GGUF file `{Path(ident).name}`"
    if kind == "local":
        return "a local checkpoint"
    return "a dense checkpoint"


def _first(*values: Any) -> Any:
    return next((v for v in values if v not in (None, "", [])), None)


def _conversion_rows(config: dict, stages: dict, options: dict) -> list[tuple[str, Any]]:
    split, quant, tune = stages.get("split", {}), stages.get("quantize", {}), stages.get("finetune", {})
    source = split.get("source") if isinstance(split.get("source"), dict) else {}
    rows: list[tuple[str, Any]] = []

    def add(label: str, *values: Any) -> None:
        value = _first(*values)
        if value is not None:
            rows.append((label, value))

    ident = source.get("id") if isinstance(source.get("id"), str) else None
    add("Source", ident if source.get("kind") == "hub" else None,
        Path(ident).name if ident and source.get("kind") == "gguf" else None)
    add("Source revision", source.get("revision"))
    add("Architecture", (config.get("architectures") or [None])[0], split.get("architecture"),
        split.get("target"))
    add("Experts", options.get("experts"), config.get("num_local_experts"), config.get("num_experts"))
    add("Active experts per token (top-k)", options.get("top_k"), config.get("num_experts_per_tok"))
    add("Shared experts", options.get("shared"))
    add("Expert size (neurons)", split.get("expert_size"), config.get("moe_intermediate_size"))
    if split.get("padding_neurons_per_layer"):
        add("Zero padding (neurons per layer)", split.get("padding_neurons_per_layer"))
    add("Layers kept dense", split.get("dense_layers") or options.get("dense_layers") or None)
    add("Activation ratio (active / total FFN parameters)", split.get("activation_ratio"))
    add("Split method", options.get("method"))
    add("Router", options.get("router"))
    add("Calibration text", _name(options.get("calibration")))
    if tune:
        add("Fine-tuning tokens", tune.get("tokens"), tune.get("train_tokens"))
        add("Fine-tuning steps", tune.get("steps"), tune.get("max_steps"))
        add("Fine-tuning data", _name(tune.get("data")))
        add("Fine-tuning stage", tune.get("stage"))
    qconf = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    if _is_fp8(config):
        add("FP8 scheme", quant.get("scheme"), qconf.get("quant_method"))
        add("FP8 format", quant.get("format"), qconf.get("fmt"), qconf.get("format"))
        add("FP8 block size", quant.get("block_size"), qconf.get("weight_block_size"))
        add("Activations", qconf.get("activation_scheme"), quant.get("activation_scheme"))
        add("Kept in source precision", quant.get("kept_in_source_dtype"))
    return rows


def _name(value: Any) -> Any:
    if isinstance(value, str) and ("/" in value or "\\" in value) and Path(value).name:
        return Path(value).name if Path(value).exists() else value
    return value


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list | tuple):
        items = [str(v) for v in value]
        text = ", ".join(items[:8]) + (f", … ({len(items)} in all)" if len(items) > 8 else "")
    elif isinstance(value, dict):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _eval_table(record: Any) -> list[str]:
    """A Markdown table from the eval stage: per-text results (a list of records, or records by name), else
    the record's own numbers as metric/value rows."""
    if not isinstance(record, dict):
        return []
    rows = _result_rows(record)
    if rows:
        flat = [_flatten(r) for r in rows]
        columns: list[str] = []
        for row in flat:
            columns += [c for c in row if c not in columns]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in flat]
        return lines
    flat = {k: v for k, v in _flatten(record).items() if k.split(".")[0] not in _BOOKKEEPING}
    if not flat:
        return []
    return ["| metric | value |", "|---|---|", *[f"| {k} | {_cell(v)} |" for k, v in flat.items()]]


def _result_rows(record: dict) -> list[dict] | None:
    for key in ("results", "texts", "evaluations"):
        value = record.get(key)
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            return value
        if isinstance(value, dict) and value and all(isinstance(r, dict) for r in value.values()):
            return [{"text": name, **r} for name, r in value.items()]
    return None


def _flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    """Scalar values of a record, nested dicts one level deep as `a.b`; lists (curves, tables) left out."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict) and not prefix:
            out.update(_flatten(value, f"{key}."))
        elif isinstance(value, str | int | float | bool) and value is not None:
            out[f"{prefix}{key}"] = value
    return out


def _usage(repo_id: str, fp8: bool) -> list[str]:
    lines = [
        "## Usage", "", "With transformers:", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model_id = "{repo_id}"',
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto")',
        'inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)',
        "output = model.generate(**inputs, max_new_tokens=32)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))", "```", "",
    ]
    if fp8:
        lines += ["transformers runs the FP8 weights natively on GPUs that support FP8 and dequantizes them "
                  "elsewhere (with a warning).", ""]
    lines += [
        "With vLLM:", "", "```bash", f"vllm serve {repo_id}", "```", "", "```python",
        "from vllm import LLM, SamplingParams", "",
        f'llm = LLM(model="{repo_id}")',
        'print(llm.generate(["The capital of France is"], SamplingParams(max_tokens=32))[0].outputs[0].text)',
        "```", "",
    ]
    return lines
