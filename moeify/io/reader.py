"""Lazy, validated reading of a checkpoint folder: config.json plus one safetensors file or indexed shards.

Every header is parsed up front (cheap: headers only), so a corrupt or inconsistent checkpoint fails in
seconds with the file named, before any long work starts. Tensors are then read one at a time on demand;
nothing keeps the whole model in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from moeify.errors import InputError
from moeify.io.safetensors_format import TensorInfo, read_header, read_tensor

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_json(path: Path, what: str) -> dict:
    """Read a JSON object file, turning every failure into a one-line InputError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InputError(f"{path}: {what} is missing") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read {what} ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} must be a JSON object")
    return data


def safe_child(folder: Path, name: object, what: str) -> Path:
    """A file name taken from an index or config, refusing anything that could name a file outside the folder.

    The check is on the name, not on where symlinks lead: the Hub cache stores every file of a snapshot as
    a symlink into `../../blobs/`, and symlinks are made by the local user, never by the checkpoint's author.
    """
    if (not isinstance(name, str) or not name or "\\" in name or "\x00" in name or name.startswith("/")
            or any(part in ("..", ".", "") for part in name.split("/"))):
        raise InputError(f"{folder}: {what} names an unsafe path {name!r}", "file names must stay inside the folder")
    return folder / name


class CheckpointReader:
    """The tensors of a checkpoint folder, by name, read lazily shard by shard."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"{self.folder}: no such folder", "give a local model folder, a Hub id or a .gguf file")
        self.tensors: dict[str, TensorInfo] = {}
        self.shard_metadata: dict[str, dict[str, str]] = {}
        self.index_metadata: dict = {}
        for shard in self._shard_files():
            tensors, metadata = read_header(shard)
            self.shard_metadata[shard.name] = metadata
            for name, info in tensors.items():
                if name in self.tensors:
                    raise InputError(f"{shard}: tensor {name!r} also appears in {self.tensors[name].file.name}",
                                     "the shards disagree; re-download the checkpoint")
                self.tensors[name] = info
        self._check_index()

    def _shard_files(self) -> list[Path]:
        index_path = self.folder / INDEX_NAME
        if index_path.exists():
            index = load_json(index_path, "the safetensors index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"{index_path}: has no weight_map", "the index is corrupt")
            self.index_metadata = index.get("metadata") or {}
            self._weight_map = weight_map
            shards = sorted({safe_child(self.folder, f, "the safetensors index") for f in weight_map.values()})
            for shard in shards:
                if not shard.is_file():
                    raise InputError(f"{index_path}: names shard {shard.name}, which is missing",
                                     "re-download the checkpoint")
            return shards
        self._weight_map = None
        single = self.folder / SINGLE_NAME
        if single.is_file():
            return [single]
        others = sorted(self.folder.glob("*.safetensors"))
        if others:
            return others
        pickles = [p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise InputError(
                f"{self.folder}: only pickle weights ({', '.join(sorted(pickles)[:3])}); moeify never unpickles files",
                "convert them to safetensors first (e.g. on the Hub's safetensors conversion space) or pick a "
                "revision with .safetensors files",
            )
        raise InputError(f"{self.folder}: no .safetensors weights found", "is this a model folder?")

    def _check_index(self) -> None:
        if self._weight_map is None:
            return
        for name, shard in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != Path(shard).name:
                where = "no shard" if info is None else info.file.name
                raise InputError(
                    f"{self.folder / INDEX_NAME}: places tensor {name!r} in {shard} but it is in {where}",
                    "the index and shards disagree; re-download the checkpoint",
                )
        extra = set(self.tensors) - set(self._weight_map)
        if extra:
            raise InputError(
                f"{self.folder / INDEX_NAME}: tensor {sorted(extra)[0]!r} is in a shard but not in the index",
                "the index and shards disagree; re-download the checkpoint",
            )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"{self.folder}: tensor {name!r} is missing", "the checkpoint is incomplete") from None

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = read_tensor(self.info(name))
        return tensor if dtype is None else tensor.to(dtype)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors shard by shard, in file order, so reads stay sequential on disk."""
        wanted = self.tensors if names is None else {n: self.info(n) for n in names}
        for info in sorted(wanted.values(), key=lambda i: (str(i.file), i.start)):
            yield info.name, read_tensor(info)

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

