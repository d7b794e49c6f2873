"""Text in, token chunks out: one loader for calibration, evaluation and fine-tuning data.

Sharing it keeps the three stages honest with each other: the same chunking, the same BOS rule, the
same handling of files, folders and `datasets` ids.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from moeify.errors import InputError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".jsonl"}
# The files a checkpoint's tokenizer is read from (copied beside every output; calibration needs one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


def packaged_text(name: str) -> Path:
    """A text shipped inside the package (see moeify/data/NOTICE for sources and licences)."""
    return Path(str(resources.files("moeify") / "data" / name))


def shared_passages(held_out: str, text: str, window: int = 200, stride: int = 100) -> list[int]:
    """Offsets of the `window`-character passages of `held_out` (one every `stride`) that occur in `text`.

    The held-out texts' promise (no passage in the calibration text) is checked in two places, when the
    calibration text is written and in the tests, with this one definition of "passage".
    """
    return [i for i in range(0, len(held_out) - window, stride) if held_out[i:i + window] in text]


def default_calibration_path() -> Path:
    return packaged_text("calibration.txt")


def load_text(spec: str | Path | None) -> str:
    """Read a text file, every text file in a folder (sorted), or a `datasets` id (`hf:org/name[:split]`).

    `None` means the shipped default calibration text, so everything works offline.
    """
    if spec is None:
        return default_calibration_path().read_text(encoding="utf-8")
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise InputError(f"{path}: no text files (.txt, .md, .jsonl) in this folder", "point at text files")
        return "\n\n".join(_read_file(p) for p in files)
    if text.startswith("hf:"):
        return _load_dataset(text[3:])
    raise InputError(f"{text}: no such text file or folder", "give a .txt file, a folder of them, or hf:DATASET_ID")


def _read_file(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    if path.suffix.lower() == ".jsonl":
        import json

        lines = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{i}: not valid JSON", "each line must be an object with a 'text' field") \
                    from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f"{path}:{i}: no 'text' field", "each line must be an object with a 'text' field")
            lines.append(record["text"])
        raw = "\n\n".join(lines)
    if not raw.strip():
        raise InputError(f"{path}: the file is empty", "give a text with some content")
    return raw


def _load_dataset(spec: str) -> str:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError as e:
        raise InputError("hf: dataset ids need the datasets package", "pip install datasets, or give a text file") \
            from e
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - datasets raises many unrelated types
        raise InputError(f"cannot load dataset {name!r} ({type(e).__name__})",
                         "check the id and the network, or download it and give a text file") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(str(x) for x in ds[column])


def needs_bos(tokenizer) -> bool:
    """Prepend BOS only when the tokenizer itself would (SmolLM2 adds none; Llama-3 does)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def tokenize_chunks(tokenizer, text: str, seq_len: int, max_tokens: int | None = None,
                    max_chunks: int | None = None, spread: bool = False) -> torch.Tensor:
    """Tokenize once and cut into fixed, non-overlapping chunks of `seq_len` ([n, seq_len] int64).

    A BOS token starts every chunk when the tokenizer uses one. The tail shorter than a chunk is dropped,
    so perplexities of different models on the same text are always over identical tokens.
    When fewer chunks are wanted than the text holds, the first ones are taken, unless `spread`: then
    they are evenly spaced over the whole text. Calibration and training need that, because a corpus is
    often several texts one after another (the shipped mixed calibration is a novel, then Wikipedia) and
    its first 4096 tokens would all come from the first one.
    """
    if seq_len < 2:
        raise InputError(f"sequence length {seq_len} is too short", "use at least 2 tokens")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = needs_bos(tokenizer)
    body = seq_len - 1 if bos else seq_len
    available = len(ids) // body
    n = available
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise InputError(f"the text has {len(ids)} tokens, fewer than one chunk of {seq_len}",
                         "give more text or a shorter --seq-len")
    chunks = torch.tensor(ids[: available * body], dtype=torch.long).view(available, body)
    if spread and n < available:
        chunks = chunks[torch.linspace(0, available - 1, n).round().long()]
    else:
        chunks = chunks[:n]
    if bos:
        chunks = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), chunks], dim=1)
    return chunks


def load_tokenizer(folder: str | Path):
    """The checkpoint's own tokenizer, from local files only (never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise InputError(f"{folder}: the tokenizer needs custom code (auto_map), which moeify never runs",
                             "use a checkpoint with a standard tokenizer (tokenizer.json)") from e
        reason = " ".join(str(e).split())
        raise InputError(f"{folder}: no usable tokenizer ({reason})", "copy the tokenizer files into the folder") from e
