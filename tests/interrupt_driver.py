"""A fork server for the interruption tests: moeify imported once, each run a fork, held at an exact point.

Starting `python -m moeify` costs seconds (torch); forking a process that has already imported moeify but
never run a torch operation costs milliseconds and is fork-safe. tests/hostile.py's `Zygote` starts this
script and sends one JSON job per line: `args` (the moeify command line), `control` (a folder), `pause_at`
(a point, below), `stdout`/`stderr` (files for the run's output) and optional `fsize` (RLIMIT_FSIZE in
bytes, to simulate a full disk). The server answers `{"pid": N}` at once and `{"exit": CODE}` when the run
ends (negative: killed by that signal).

When a run reaches its pause point it creates `<control>/paused` and waits until `<control>/go` exists; the
test meanwhile sends SIGINT or SIGKILL, or lets it go on. Nothing here is part of moeify: the pause is
patched in from outside. Points: `write:N` / `write:last` (before the N-th / the last planned tensor is
written), `metadata` (before moeify.json is written: every shard is complete), `replace` (the temporary
folder is finished, before it is renamed into place), `exchanged` (right after an --overwrite swapped the
new output with the old one, before the old one is deleted), `track:WORD:N` (before the N-th item of a progress
loop whose description starts with WORD, e.g. `track:distilling:2`).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

JOB: dict = {}


def pause(point: str) -> None:
    if point != JOB.get("pause_at"):
        return
    control = Path(JOB["control"])
    (control / "paused").write_text(point)
    while not (control / "go").exists():
        time.sleep(0.02)  # SIGINT lands here as KeyboardInterrupt, like Ctrl-C in the middle of the work


def install() -> None:
    import moeify.cli  # noqa: F401 - registers the commands
    import moeify.io.output as output
    import moeify.io.writer as writer
    import moeify.metadata as metadata
    import moeify.quant.quantize
    import moeify.split.convert

    calls = {"write": 0}
    original_write = writer.ShardedWriter.write

    def write(self, name, tensor):
        calls["write"] += 1
        pause(f"write:{calls['write']}")
        if sum(len(s.written) for s in self._shards) == len(self._specs) - 1:
            pause("write:last")
        return original_write(self, name, tensor)

    writer.ShardedWriter.write = write
    original_metadata = metadata.write_metadata

    def write_metadata(*args, **kwargs):
        pause("metadata")
        return original_metadata(*args, **kwargs)

    modules = [moeify.split.convert, moeify.quant.quantize]
    try:
        import transformers  # noqa: F401

        import moeify.finetune.export  # noqa: F401 - imported here once, not in every forked run
        import moeify.finetune.run

        modules.append(moeify.finetune.run)
    except ImportError:
        pass
    for module in modules:
        if hasattr(module, "write_metadata"):
            module.write_metadata = write_metadata
    import moeify.cli.console as console

    original_track = console.Output.track

    def track(self, items, description, total=None, **kwargs):
        key = description.split()[0].lower()
        for i, item in enumerate(original_track(self, items, description, total, **kwargs), 1):
            pause(f"track:{key}:{i}")
            yield item

    console.Output.track = track
    original_replace = output._replace

    def replace(tmp, out):
        pause("replace")
        return original_replace(tmp, out)

    output._replace = replace
    original_exchange = output._exchange

    def exchange(a, b):
        swapped = original_exchange(a, b)
        pause("exchanged")
        return swapped

    output._exchange = exchange


def run_child(job: dict) -> None:
    """In the forked child: redirect output, apply limits, run the command, exit with its code."""
    JOB.update(job)
    code = 99
    try:
        out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        if job.get("fsize"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
        import torch

        torch.set_num_threads(1)
        from moeify.cli import app

        try:
            app(args=job["args"], prog_name="moeify")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report anything, the test decides
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    # A shell that starts a job in the background (`cmd &`, some CI runners) makes it ignore SIGINT, and
    # Python then installs no KeyboardInterrupt handler: a paused run would sleep through the test's
    # SIGINT and the test would wait forever. Ctrl-C behaviour is what is under test, so restore it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    install()
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(job)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
