"""Streaming, size-bounded shard writing from a plan.

The full list of output tensors (name, dtype, shape) is known before the work starts — it is the plan
checked on the meta device — so each shard's header is written first and every tensor goes straight
to its place on disk as soon as it is computed. Nothing is buffered, which is why peak memory does not
grow with the number of layers. Files are created with `open()`, so they get the user's umask
(safetensors' own `save_file` makes them 0600).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeify.errors import OutputError
from moeify.io.reader import INDEX_NAME, SINGLE_NAME
from moeify.io.safetensors_format import dtype_size, encode_header, tensor_bytes

DEFAULT_SHARD_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


@dataclass
class _Shard:
    file_name: str
    specs: list[TensorSpec]
    offsets: dict[str, int] = field(default_factory=dict)  # absolute offset of each tensor in the file
    header: bytes = b""
    written: set[str] = field(default_factory=set)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Group tensors in order into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class ShardedWriter:
    """Writes the planned tensors into `folder`, in any order, then the index.

    Use as a context manager; `close()` fails if any planned tensor was not written, so an incomplete
    output never gets an index or a config that make it look finished.
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tensor {dup!r} planned twice")
        self.folder = Path(folder)
        groups = plan_shards(specs, max_shard_bytes)
        n = len(groups)
        self._shards: list[_Shard] = []
        self._where: dict[str, _Shard] = {}
        for i, group in enumerate(groups):
            file_name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            shard = _Shard(file_name, group)
            shard.header, rel = encode_header([(s.name, s.dtype, s.shape) for s in group], metadata)
            shard.offsets = {s.name: len(shard.header) + begin for s, (begin, _) in zip(group, rel, strict=True)}
            self._shards.append(shard)
            for s in group:
                self._where[s.name] = shard
        self._specs = {s.name: s for s in specs}
        self._files: dict[str, object] = {}

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files()

    def _file(self, shard: _Shard):
        f = self._files.get(shard.file_name)
        if f is None:
            f = open(self.folder / shard.file_name, "wb")  # noqa: SIM115 - closed in close()
            total = len(shard.header) + sum(s.nbytes for s in shard.specs)
            f.write(shard.header)
            f.truncate(total)
            self._files[shard.file_name] = f
        return f

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"tensor {name!r} was not planned")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, plan says "
                             f"{spec.dtype} {spec.shape}")
        shard = self._where[name]
        if name in shard.written:
            raise ValueError(f"tensor {name!r} written twice")
        try:
            f = self._file(shard)
            f.seek(shard.offsets[name])
            f.write(tensor_bytes(tensor))
        except OSError as e:
            raise OutputError(f"{self.folder}: writing {name} failed ({e.strerror})",
                              "free disk space or choose another output folder") from e
        shard.written.add(name)
        if len(shard.written) == len(shard.specs):
            self._files.pop(shard.file_name).close()

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def close(self) -> None:
        missing = [n for s in self._shards for n in (x.name for x in s.specs) if n not in s.written]
        self._close_files()
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self._specs.values())},
                "weight_map": {s.name: sh.file_name for sh in self._shards for s in sh.specs},
            }
            try:
                (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            except OSError as e:
                raise OutputError(f"{self.folder}: writing the index failed ({e.strerror})",
                                  "free disk space or choose another output folder") from e

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self._specs.values())
