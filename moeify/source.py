"""Turning what the user typed (folder, Hub id, .gguf file) into a local safetensors checkpoint folder.

Hub downloads take safetensors, JSON and tokenizer files only: pickle weights and remote code never
reach the disk. A GGUF file is read through transformers' GGUF loader (dequantized to float32 — the
only place a whole model is loaded, since GGUF is not lazily readable by transformers) and cached as a
safetensors folder keyed by the file's size and mtime, so the next run starts instantly.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from moeify.data import TOKENIZER_FILES
from moeify.errors import InputError
from moeify.progress import SILENT, Reporter

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
# Copied from the source into every output: the tokenizer, its chat template and the generation defaults.
SIDE_FILES = (*TOKENIZER_FILES, "chat_template.jinja", "chat_template.json", "generation_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    """A resolved model: a local folder plus where it came from (recorded in moeify.json)."""

    folder: Path
    kind: str  # "local", "hub" or "gguf"
    id: str
    revision: str | None = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"kind": self.kind, "id": self.id, "revision": self.revision, **self.extra}


def cache_dir() -> Path:
    root = os.environ.get("MOEIFY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moeify")
    return Path(root)


def resolve_source(model: str | Path, revision: str | None = None, token: str | None = None,
                   reporter: Reporter = SILENT) -> Source:
    text = str(model)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{path}: no such GGUF file", "check the path")
        return gguf_to_safetensors(path, reporter)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: no config.json in this folder", "point at a Hugging Face model folder")
        return Source(path, "local", str(path.resolve()))
    if path.exists():
        raise InputError(f"{path}: not a model folder or .gguf file", "give a folder with config.json")
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return download_from_hub(text, revision, token, reporter)
    raise InputError(f"{text}: no such folder", "give a local model folder, a Hub id (org/name) or a .gguf file")


def download_from_hub(repo_id: str, revision: str | None, token: str | None, reporter: Reporter) -> Source:
    reporter.status(f"fetching {repo_id} from the Hub (safetensors, JSON and tokenizer files only)")
    folder = _snapshot(repo_id, revision, token, HUB_PATTERNS)
    if not (folder / "config.json").is_file():
        raise InputError(f"{repo_id}: the repository has no config.json", "is it a transformers model?")
    return Source(folder, "hub", repo_id, revision or _snapshot_revision(folder))


def fetch_config(repo_id: str, revision: str | None = None, token: str | None = None) -> dict:
    """A Hub model's config.json alone (from the local Hub cache when it is there), for checks that read no weights.

    Goes through `snapshot_download` like a real download, not `hf_hub_download`: offline, the latter retries
    its request five times with backoff (about 30 s of "Retrying in 1s" warnings) before it gives up, while
    this fails at once with the same one-line errors as `moeify split`.
    """
    import json

    folder = _snapshot(repo_id, revision, token, ["config.json"])
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{repo_id}: the repository has no config.json", "is it a transformers model?")
    return json.loads(path.read_text(encoding="utf-8"))


OFFLINE_HINT = "give a local folder (in a recipe: model=PATH), or set HF_HUB_OFFLINE=1 once it is cached"


def _snapshot(repo_id: str, revision: str | None, token: str | None, patterns: list[str]) -> Path:
    """snapshot_download with its failures as one-line InputErrors (offline, gated, missing, bad revision)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
    except GatedRepoError as e:
        raise InputError(f"{repo_id} is gated", "accept its licence on the Hub and log in with `hf auth login`") from e
    except RepositoryNotFoundError as e:
        raise InputError(f"{repo_id}: no such model on the Hub (or it is private)",
                         "check the id, or log in with `hf auth login`") from e
    except RevisionNotFoundError as e:
        raise InputError(f"{repo_id}: revision {revision!r} not found", "check --revision") from e
    except LocalEntryNotFoundError as e:
        raise InputError(f"{repo_id}: the Hub cannot be reached and the model is not in the local cache",
                         OFFLINE_HINT) from e
    except OSError as e:
        raise InputError(f"{repo_id}: download failed ({e})", "check the network, " + OFFLINE_HINT) from e


def _snapshot_revision(folder: Path) -> str | None:
    return folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None


def gguf_to_safetensors(path: Path, reporter: Reporter = SILENT) -> Source:
    """Dequantize a GGUF model once into a cached safetensors folder and return it."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    source = Source(target, "gguf", str(path.resolve()), extra={"gguf_file": path.name})
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return source
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise InputError("reading .gguf files needs the gguf package", "pip install gguf") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeify.io.output import atomic_output

    reporter.status(f"reading {path.name} through transformers' GGUF loader (dequantizing, once)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError, RuntimeError, struct.error, IndexError, EOFError, TypeError,
            AttributeError, OverflowError) as e:  # a stranger's file: any parse failure is an input problem
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: transformers cannot read this GGUF file ({reason})",
                         "convert it to safetensors with llama.cpp's tools or use the original checkpoint") from e
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    with atomic_output(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():  # save_pretrained's safetensors files are 0600; give them the umask
            _apply_umask(f)
    return source


def _apply_umask(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, chat template and generation config files unchanged; return their names."""
    copied = []
    for name in SIDE_FILES:
        f = src / name
        if f.is_file():
            shutil.copyfile(f, dst / name)
            copied.append(name)
    return copied
