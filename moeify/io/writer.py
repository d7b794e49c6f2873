"""Streaming, size-bounded shard writing from a plan.

The full list of output tensors (name, dtype, shape) is known before the work starts — it is the plan
checked on the meta device — so each shard's header is written first and every tensor goes straight
to its place on disk as soon as it is computed. Nothing but the write-behind queue is buffered, which is
why peak memory does not grow with the number of layers. Files are created with `open()`, so they get the
user's umask (safetensors' own `save_file` makes them 0600).

Writing happens behind the caller, on one thread, with at most `write_behind_bytes` queued: the kernel
throttles a writer whose dirty pages outrun the disk, and a split that waited for each tensor to reach the
page cache spent 6.5 s of 13.5 s writing (cProfile, 4 layers of 8B shapes, docs/benchmarks.md). With the queue the next
layer's arithmetic runs while the previous layer drains. A failed write surfaces at the next `write()` or
at `close()`, as the same `OutputError`.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeify.errors import OutputError
from moeify.io.reader import INDEX_NAME, SINGLE_NAME
from moeify.io.safetensors_format import dtype_size, encode_header, tensor_bytes

DEFAULT_SHARD_BYTES = 4 * 1024**3
# A queue of a few expert matrices is enough to keep the writer thread busy while the caller computes; a
# larger one only grows the resident set as the page cache throttles harder later in a run.
DEFAULT_WRITE_BEHIND_BYTES = 256 * 1024**2


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
                 metadata: dict[str, str] | None = None, write_behind_bytes: int | None = None):
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
        self._files: dict[str, object] = {}  # only the writing thread touches these while it runs
        if write_behind_bytes is None:  # looked up per writer, so a test or a caller can change the default
            write_behind_bytes = DEFAULT_WRITE_BEHIND_BYTES
        self._behind = _WriteBehind(write_behind_bytes) if write_behind_bytes > 0 else None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            if self._behind is not None:
                self._behind.abort()  # what is queued is dropped: the output is being abandoned anyway
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
        """Queue `tensor` for its place in its shard. It is read later, on the writer thread, without a copy
        when it is contiguous on the CPU: the caller must not modify it in place afterwards."""
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"tensor {name!r} was not planned")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, plan says "
                             f"{spec.dtype} {spec.shape}")
        shard = self._where[name]
        if name in shard.written:
            raise ValueError(f"tensor {name!r} written twice")
        if self._behind is not None:
            self._behind.check()  # an earlier tensor's failed write stops the run here, not at the end
        data = tensor_bytes(tensor)  # contiguous CPU bytes, made here: a GPU tensor is copied by its own thread
        shard.written.add(name)
        last = len(shard.written) == len(shard.specs)
        if self._behind is None:
            self._put(shard, name, data, last)
        else:
            self._behind.submit(lambda: self._put(shard, name, data, last), len(data))

    def _put(self, shard: _Shard, name: str, data: memoryview, last: bool) -> None:
        try:
            f = self._file(shard)
            f.seek(shard.offsets[name])
            f.write(data)
            if last:
                self._files.pop(shard.file_name).close()
        except OSError as e:
            raise self._failed(name, e) from e

    def _failed(self, name: str, e: OSError) -> OutputError:
        return OutputError(f"{self.folder}: writing {name} failed ({e.strerror})",
                           "free disk space or choose another output folder")

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def close(self) -> None:
        missing = [n for s in self._shards for n in (x.name for x in s.specs) if n not in s.written]
        try:
            if self._behind is not None:
                self._behind.finish()  # every queued tensor on disk, or the first failure raised
        finally:
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


class _WriteBehind:
    """One thread that runs queued writes in order, with at most `limit` bytes waiting.

    A single tensor larger than the limit is still accepted (alone): the limit bounds memory, it must not
    refuse a model. The first failure is kept and re-raised in the caller's thread; later writes are skipped.
    """

    def __init__(self, limit: int):
        self._limit = limit
        self._pending = 0
        self._queue: deque[tuple[Callable[[], None] | None, int]] = deque()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="moeify-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], nbytes: int) -> None:
        with self._cond:
            while self._pending and self._pending + nbytes > self._limit and self._error is None:
                self._cond.wait()
            self._raise()
            self._pending += nbytes
            self._queue.append((job, nbytes))
            self._cond.notify_all()

    def check(self) -> None:
        with self._cond:
            self._raise()

    def finish(self) -> None:
        """Wait until everything queued is written, stop the thread, and raise the first failure if any."""
        with self._cond:
            while self._pending and self._error is None:
                self._cond.wait()
        self._stop()
        with self._cond:
            self._raise()

    def abort(self) -> None:
        with self._cond:
            self._queue.clear()
            self._pending = 0
        self._stop()

    def _stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if not self._queue:
                    return
                job, nbytes = self._queue.popleft()
            try:
                if self._error is None:
                    job()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which raises it
                with self._cond:
                    self._error = e
            finally:
                with self._cond:
                    self._pending = max(0, self._pending - nbytes)
                    self._cond.notify_all()
