"""Atomic output folders: work happens in a hidden temporary folder beside the target, renamed at the end.

Guarantees every stage relies on:
- an existing output is never replaced without `overwrite=True`;
- a crash, Ctrl-C or full disk leaves no folder at the target path (the temporary one is removed on
  any Python-visible failure; after SIGKILL it stays hidden under a `.moeify-tmp-` name and the next run
  reports and removes it);
- two runs aimed at the same output cannot both win: an exclusive lock file beside the target decides.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from moeify.errors import OutputError, UsageError

TMP_PREFIX = ".moeify-tmp-"
LOCK_SUFFIX = ".moeify-lock"


def check_output_path(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse outputs that would destroy an input or an existing result, before any work starts."""
    out = output.resolve()
    for inp in inputs:
        src = inp.resolve()
        if out == src:
            raise UsageError(f"output {output} is the input folder", "choose a different -o/--output")
        if src in out.parents:
            raise UsageError(f"output {output} is inside the input folder {inp}", "write it somewhere else")
        if out in src.parents and overwrite:
            raise UsageError(f"output {output} contains the input {inp}; --overwrite would delete it",
                             "choose a different -o/--output")
    if out.exists() and not overwrite:
        raise UsageError(f"output {output} already exists", "pass --overwrite to replace it, or choose another -o")


def stale_temporaries(output: Path) -> list[Path]:
    """Temporary folders left beside `output` by runs that were killed (SIGKILL, power loss)."""
    parent = output.resolve().parent
    if not parent.is_dir():
        return []
    found = []
    for p in parent.glob(f"{TMP_PREFIX}{output.name}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        found.append(p)
    return found


def writer_pid(output: Path) -> int | None:
    """The pid of a live moeify run that holds `output`'s lock; None when none does (or it was killed)."""
    lock = output.parent / f".{output.name}{LOCK_SUFFIX}"
    try:
        pid = int(lock.read_text().strip() or "0")
    except (OSError, ValueError):
        return None
    return pid if pid and _pid_alive(pid) else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _lock(output: Path) -> Iterator[None]:
    lock = output.parent / f".{output.name}{LOCK_SUFFIX}"
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid = writer_pid(output)
            if pid:
                raise OutputError(f"another moeify run (pid {pid}) is writing {output}",
                                  "wait for it to finish or choose another output") from None
            lock.unlink(missing_ok=True)  # left by a killed run
    else:  # pragma: no cover - lost a race twice
        raise OutputError(f"cannot lock {output}", "another run is writing it")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(output: str | Path, overwrite: bool = False, on_stale=None) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `output`, on any failure it is removed.

    `on_stale(path)` is called for each temporary folder a killed run left behind (then it is removed).
    """
    output = Path(output)
    parent = output.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {parent} ({e.strerror})", "check the path and permissions") from e
    with _lock(output):
        for stale in stale_temporaries(output):
            if on_stale is not None:
                on_stale(stale)
            shutil.rmtree(stale, ignore_errors=True)
        if output.exists() and not overwrite:
            raise UsageError(f"output {output} already exists", "pass --overwrite to replace it, or choose another -o")
        tmp = parent / f"{TMP_PREFIX}{output.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            _replace(tmp, output.resolve())
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise OutputError(f"ran out of space writing {output} ({e.strerror})",
                                  "free disk space or choose another output folder; nothing was written") from e
            raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replace(tmp: Path, output: Path) -> None:
    """Swap the finished folder into place; an old output is moved aside first and deleted last.

    Where the kernel can exchange two paths atomically, the old output and the new one trade places in one
    step, so at every instant `output` is one complete folder; the old one, now at the temporary path, is
    deleted after (a kill before that leaves it hidden, and the next run removes it as stale).
    """
    if output.is_dir() and not output.is_symlink() and _exchange(tmp, output):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if output.exists() or output.is_symlink():
        old = output.parent / f"{TMP_PREFIX}{output.name}-old-{int(time.time())}"
        os.rename(output, old)
        os.rename(tmp, output)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.rename(tmp, output)
