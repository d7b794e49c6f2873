"""The sharded writer's write-behind queue: same bytes as writing in place, bounded memory, failures surfaced."""

from __future__ import annotations

import errno
import threading
import time

import pytest
import torch

from moeify.errors import OutputError
from moeify.io import writer as writer_module
from moeify.io.reader import CheckpointReader
from moeify.io.writer import ShardedWriter, TensorSpec


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(64 + i, 32, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
            for i in range(12)}


def _write(folder, tensors, **kwargs) -> None:
    folder.mkdir()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(folder, specs, max_shard_bytes=20_000, **kwargs) as w:
        for name in reversed(tensors):  # out of plan order, as a split writes the routers before the experts
            w.write(name, tensors[name])


def test_write_behind_writes_the_same_files_as_writing_in_place(tmp_path):
    tensors = _tensors()
    _write(tmp_path / "behind", tensors, write_behind_bytes=10_000)
    _write(tmp_path / "inline", tensors, write_behind_bytes=0)
    names = sorted(p.name for p in (tmp_path / "inline").iterdir())
    assert len(names) > 2  # several shards and their index
    assert names == sorted(p.name for p in (tmp_path / "behind").iterdir())
    for name in names:
        assert (tmp_path / "behind" / name).read_bytes() == (tmp_path / "inline" / name).read_bytes()
    reader = CheckpointReader(tmp_path / "behind")
    for name, t in tensors.items():
        assert torch.equal(reader.get(name), t)


def test_queued_bytes_stay_under_the_limit(tmp_path, monkeypatch):
    """The queue never holds more than its limit (one larger tensor alone is allowed), so memory is bounded."""
    limit = 30_000
    gate = threading.Event()
    seen = []
    original = ShardedWriter._put

    def slow_put(self, shard, name, data, last):
        gate.wait(5)  # the writer thread is stuck until the caller has queued as much as it may
        seen.append(self._behind._pending)
        return original(self, shard, name, data, last)

    monkeypatch.setattr(ShardedWriter, "_put", slow_put)
    tensors = _tensors()
    releaser = threading.Timer(0.3, gate.set)
    releaser.start()
    _write(tmp_path / "out", tensors, write_behind_bytes=limit)
    releaser.join()
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    assert max(sizes) < limit < sum(sizes)
    assert max(seen) <= limit
    assert max(seen) > max(sizes)  # several tensors did queue while the thread was stuck
    reader = CheckpointReader(tmp_path / "out")
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())


def test_a_failed_write_behind_surfaces_as_a_clear_error(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = ShardedWriter._put

    def failing_put(self, shard, name, data, last):
        calls["n"] += 1
        if calls["n"] == 3:
            raise self._failed(name, OSError(errno.ENOSPC, "No space left on device"))
        return original(self, shard, name, data, last)

    monkeypatch.setattr(ShardedWriter, "_put", failing_put)
    with pytest.raises(OutputError, match="No space left on device") as info:
        _write(tmp_path / "out", _tensors())
    assert "free disk space" in info.value.hint
    assert calls["n"] == 3  # nothing more was written after the failure
    assert not any(t.name == "moeify-writer" for t in threading.enumerate())


def test_an_abandoned_write_stops_the_thread_and_closes_the_files(tmp_path, monkeypatch):
    opened = []
    original_open = open

    def tracking_open(*args, **kwargs):
        f = original_open(*args, **kwargs)
        opened.append(f)
        return f

    monkeypatch.setattr(writer_module, "open", tracking_open, raising=False)
    tensors = _tensors()
    folder = tmp_path / "out"
    folder.mkdir()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with pytest.raises(KeyboardInterrupt):
        with ShardedWriter(folder, specs, max_shard_bytes=20_000) as w:
            for i, (name, t) in enumerate(tensors.items()):
                if i == 5:
                    for _ in range(500):  # let the thread open the first shard, then interrupt
                        if opened:
                            break
                        time.sleep(0.01)
                    raise KeyboardInterrupt
                w.write(name, t)
    assert opened and all(f.closed for f in opened)
    assert not (folder / "model.safetensors.index.json").exists()
    assert not any(t.name == "moeify-writer" for t in threading.enumerate())
